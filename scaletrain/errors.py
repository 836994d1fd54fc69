"""Errors shared by every component."""


class NotSupportedError(ValueError):
    """A known option that scaletrain does not implement (yet)."""
