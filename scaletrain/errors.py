"""Errors shared by every component."""


class NotSupportedError(ValueError):
    """A known option that scaletrain does not implement (yet)."""


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or inf (nonfinite_loss='stop'): every rank stops, and the last committed
    checkpoint, written before it, holds the last good state."""
