"""The Middleware interface; every hook defaults to doing nothing."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch


class Middleware:
    name = "middleware"

    def configure_strategy(self, strategy) -> None:
        """Before the strategy sets up the model (e.g. a precision policy)."""

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        """Before the strategy wraps/shards the model."""
        return model

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Around every forward and loss computation, training and evaluation."""
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss handed to backward."""
        return loss

    def before_optimizer_step(self, optimizer) -> None:
        """After the last backward of a step, before gradient clipping."""

    def optimizer_step(self, optimizer, step: Callable[[], None]) -> Optional[bool]:
        """Take over the optimizer step: return True if `step` ran, False if it
        was skipped; None leaves it to the next middleware (or the trainer)."""
        return None

    def after_optimizer_step(self, stepped: bool) -> None:
        """After the step (or its skip)."""

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return self.name
