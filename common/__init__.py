"""lte.common."""
