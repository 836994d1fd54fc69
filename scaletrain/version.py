"""The package version (pyproject.toml holds the same), importable without the package."""
__version__ = "0.1.0"
