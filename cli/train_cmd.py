"""`xm train` (being written)."""
