"""The Middleware interface; every hook defaults to doing nothing."""
from __future__ import annotations

import contextlib
from typing import Any

import torch


class Middleware:
    name = "middleware"

    def configure_strategy(self, strategy) -> None:
        """Before the strategy sets up the model (e.g. a precision policy)."""

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        """Before the strategy wraps/shards the model."""
        return model

    def after_training(self, model: torch.nn.Module) -> None:
        """When train() ends: undo what must not outlive training."""

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Around every forward and loss computation, training and evaluation."""
        return contextlib.nullcontext()

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return self.name
