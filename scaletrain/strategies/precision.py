"""Precision, owned by the strategy (Lightning's Precision plugin): fp32, bf16, or fp16 with loss scaling.

Who casts depends on the backend, so the strategy decides
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
from typing import Any, Optional

import torch
from transformers.utils.import_utils import is_torch_tf32_available

from ..errors import NotSupportedError


def check_options(args) -> None:
    if args.bf16 and args.fp16:
        raise ValueError("bf16=True and fp16=True are both set; choose one (bf16 where the hardware has it: it "
                         "needs no loss scaling)")
    if args.tf32 and not is_torch_tf32_available():
        raise ValueError("tf32=True needs an Ampere or newer NVIDIA GPU (CUDA >= 11); drop it on this machine")


def check_full_eval(args, owner: str) -> None:
    """bf16/fp16_full_eval cast the model in place, which a backend that owns the parameters cannot follow."""
    for name in ("bf16_full_eval", "fp16_full_eval"):
        if getattr(args, name):
            raise NotSupportedError(
                f"{name}=True with strategy {args.strategy!r}: it casts the model in place, but {owner} keep "
                f"their own dtype; set {name[:4]}=True to evaluate in {name[:4]} under this strategy, or evaluate "
                "with strategy ddp or single")


def apply_tf32(setting: Optional[bool]) -> None:
    """HF's meaning: True/False switch TF32 matmuls where the hardware has them; None leaves torch's default.
    Set on torch directly: transformers' enable_tf32 is lru_cache'd, so a setting it applied once in a process
    was not applied again (a Trainer with tf32=True after one with tf32=False kept IEEE matmuls)."""
    if setting is None or not is_torch_tf32_available():
        return
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        torch.backends.fp32_precision = "tf32" if setting else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = setting
        torch.backends.cudnn.allow_tf32 = setting


class Precision:
    """How forwards compute and how the loss and the optimizer step are scaled."""

    def __init__(self, dtype: Optional[torch.dtype] = None, device_type: str = "cpu", backend_casts: bool = False,
                 scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"mixed precision dtype {dtype} must be torch.bfloat16 or torch.float16")
        self.dtype, self.device_type, self.backend_casts, self.scaler = dtype, device_type, backend_casts, scaler

    @property
    def is_mixed(self) -> bool:
        return self.dtype is not None

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.dtype is None or self.backend_casts:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clipping must see the true gradients

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step; False when inf/NaN gradients (on any rank) made the scaler skip it."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # calls optimizer.step() only if no rank found inf/NaN
        self.scaler.update()
        return not self.scaler.get_scale() < before  # the scale backs off exactly when the step was skipped

    def loss_scale(self) -> Optional[float]:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def describe(self) -> str:
        if self.dtype is None:
            return "fp32"
        how = "backend policy" if self.backend_casts else "autocast"
        scaling = ", dynamic loss scaling" if self.scaler is not None else ""
        return f"{str(self.dtype).removeprefix('torch.')} ({how}{scaling})"
