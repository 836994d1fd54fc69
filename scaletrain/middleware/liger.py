"""Liger kernels (HF's use_liger_kernel / liger_kernel_config): Triton kernels patched into a transformers
model (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), through transformers' own integration.

A model transform, so it runs before the strategy wraps or shards the model, on the base model under LoRA.
Liger's kernels are Triton kernels for CUDA GPUs: refused before launch on any other device.
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import NotSupportedError
from .base import Middleware


def check_options(args) -> None:
    if args.liger_kernel_config is not None and not args.use_liger_kernel:
        raise NotSupportedError(f"liger_kernel_config={args.liger_kernel_config!r} is read only with "
                                "use_liger_kernel=True; set it, or drop liger_kernel_config")
    if not args.use_liger_kernel:
        return
    if args.liger_kernel_config is not None and not isinstance(args.liger_kernel_config, dict):
        raise ValueError(f"liger_kernel_config={args.liger_kernel_config!r} must be a dict of Liger's "
                         "options, e.g. {'rope': True, 'fused_linear_cross_entropy': False}")
    if args.device.type != "cuda":
        raise NotSupportedError(f"use_liger_kernel=True needs a CUDA GPU (Liger's kernels are Triton kernels); "
                                f"this process runs on {args.device.type}: leave use_liger_kernel off here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise NotSupportedError("use_liger_kernel=True needs the liger-kernel package: pip install liger-kernel")


class LigerKernels(Middleware):
    name = "liger"

    def __init__(self, config: dict) -> None:
        self.config = dict(config or {})

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        from transformers import PreTrainedModel
        from transformers.integrations.liger import apply_liger_kernel
        from transformers.trainer_utils import unwrap_peft_model

        if not isinstance(unwrap_peft_model(model), PreTrainedModel):
            # transformers only warns and trains without the kernels
            raise ValueError(f"use_liger_kernel=True patches transformers models; {type(model).__name__} is not "
                             "a PreTrainedModel (or a PEFT model around one)")
        apply_liger_kernel(model, self.config)
        return model

    def describe(self) -> str:
        return f"liger kernels {self.config or '(defaults)'}"
