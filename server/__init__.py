"""lte.server."""
