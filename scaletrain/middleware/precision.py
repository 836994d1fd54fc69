"""Mixed precision: bf16, or fp16 with dynamic loss scaling.

Who casts depends on the backend, so the strategy is asked first
(`Strategy.enable_mixed_precision`): FSDP2 applies a MixedPrecisionPolicy
(bf16/fp16 compute on gathered parameters, fp32 shards and fp32 gradient
reduction) and DeepSpeed its own bf16/fp16 block with fp32 master weights;
both answer True and no autocast is added. Single device and DDP answer False
and the forward runs under torch.autocast, parameters and gradients in fp32.

fp16 needs loss scaling. DeepSpeed scales inside its engine; for the others a
torch GradScaler (made by the strategy: FSDP's must agree across ranks on
whether any shard overflowed) multiplies the loss, unscales the gradients
before clipping, and skips the step when they hold inf/NaN, halving the scale.
The trainer counts skipped steps and does not advance the LR schedule on them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from .base import Middleware


class MixedPrecision(Middleware):
    name = "mixed_precision"

    def __init__(self, dtype: torch.dtype, strategy) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"mixed precision dtype {dtype} must be torch.bfloat16 or torch.float16")
        self.dtype = dtype
        self.device_type = strategy.device.type
        self.backend_casts = False
        self.scaler = None
        self.strategy = strategy

    def configure_strategy(self, strategy) -> None:
        self.device_type = strategy.device.type
        self.backend_casts = strategy.enable_mixed_precision(self.dtype)
        if self.dtype == torch.float16 and self.scaler is None:
            self.scaler = strategy.make_grad_scaler()  # None when the backend scales the loss itself

    def forward_context(self):
        if self.backend_casts:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def before_optimizer_step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clipping must see the true gradients

    def optimizer_step(self, optimizer, step: Callable[[], Optional[bool]]) -> Optional[bool]:
        if self.scaler is None:
            return None
        before = self.scaler.get_scale()
        # GradScaler.step calls optimizer.step() only if no rank found inf/NaN
        self.scaler.step(optimizer)
        self.scaler.update()
        return not self.scaler.get_scale() < before  # the scale backs off exactly when the step was skipped

    def log_values(self) -> dict[str, float]:
        scale = self.scaler.get_scale() if self.scaler is not None else self.strategy.loss_scale()
        return {"loss_scale": float(scale)} if scale is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def describe(self) -> str:
        how = "backend policy" if self.backend_casts else "autocast"
        scaling = ", dynamic loss scaling" if self.scaler is not None else ""
        return f"{str(self.dtype).removeprefix('torch.')} ({how}{scaling})"
