"""Errors of a hyperparameter search, by who must act on them."""
from __future__ import annotations


class SearchConfigError(ValueError):
    """The search itself is set up wrong (its space, objective or options): every trial would fail the same
    way, so the search stops on every rank instead of recording failed trials."""


class TrialFailed(Exception):
    """A trial raised on at least one rank (all ranks agreed on it); the study records it as failed and the
    search goes on."""


class SearchAborted(RuntimeError):
    """Rank 0 stopped the search outside a trial (its study or storage failed); the other ranks stop too."""
