"""lte.proto."""
