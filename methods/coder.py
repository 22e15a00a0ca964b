"""Placeholder: being written (see docs/architecture.md, the method interface)."""
