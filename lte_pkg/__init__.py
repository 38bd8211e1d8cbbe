"""lte: train networks from scratch with parallel low-rank adapters on a parameter server."""

__version__ = "0.1.0"
