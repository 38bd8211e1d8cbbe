"""The package version, for the modules below ``lte`` (which re-exports it as ``lte.__version__``).

Kept here, not in ``lte/__init__.py``, so that no sub-package imports the package's top; it must
equal ``[project] version`` in pyproject.toml (tests/test_packaging.py checks that).
"""

__version__ = "0.1.0"
