"""Errors shared by every component, and the hint their messages share."""
import difflib


class NotSupportedError(ValueError):
    """A known option that scaletrain does not implement (yet)."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be written or resumed from. Also a ValueError, the type the HF Trainer
    raises for a checkpoint it cannot find, so scripts written for it catch this one too."""


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or inf (nonfinite_loss='stop'): every rank stops, and the last committed
    checkpoint, written before it, holds the last good state."""


def did_you_mean(name: str, known) -> str:
    """"; did you mean 'x'?" for the closest of `known`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
