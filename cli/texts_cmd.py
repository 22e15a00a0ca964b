"""`xm texts` (being written)."""
