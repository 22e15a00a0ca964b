"""`xm methods` (being written)."""
