"""lte.worker."""
