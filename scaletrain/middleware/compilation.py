"""torch.compile (HF's torch_compile, torch_compile_backend, torch_compile_mode).

A model transform, the last one, so it compiles what the other middleware built (LoRA adapters,
activation checkpointing) before the strategy wraps the model. `Module.compile()` compiles in place,
so parameter names, and with them checkpoints and exports, are those of the eager model. Strategies that
shard per transformer block (FSDP2) compile each block, as torchtitan does, so the all-gathers between
blocks stay outside the compiled graphs; the others compile the whole model. DeepSpeed's engine wraps
the model in its own way and is refused.
"""
from __future__ import annotations

import logging

import torch

from ..errors import NotSupportedError
from ..modeling import block_classes
from .base import Middleware

logger = logging.getLogger(__name__)
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_options(args) -> None:
    """HF's rules (a backend or mode implies torch_compile; inductor by default), then what we refuse."""
    if args.torch_compile_backend is not None or args.torch_compile_mode is not None:
        args.torch_compile = True
    if not args.torch_compile:
        return
    if args.torch_compile_backend is None:
        args.torch_compile_backend = "inductor"
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.torch_compile_backend not in backends:
        raise ValueError(f"torch_compile_backend={args.torch_compile_backend!r} is not a torch.compile backend; "
                         f"available: {', '.join(sorted(backends))}")
    if args.torch_compile_mode not in _MODES:
        raise ValueError(f"torch_compile_mode={args.torch_compile_mode!r} must be one of {_MODES[1:]}")
    if args.strategy.startswith("zero"):
        raise NotSupportedError(f"torch_compile with strategy {args.strategy!r}: DeepSpeed's engine wraps the "
                                "model its own way and is not compiled by scaletrain; use ddp or fsdp (zero3's "
                                "sharding: fsdp)")


class TorchCompile(Middleware):
    name = "torch_compile"

    def __init__(self, backend: str, mode) -> None:
        self.backend, self.mode = backend, mode
        self.compiled = 0

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        if strategy.compiles_per_block:
            classes = block_classes(model, strategy.args.fsdp_layer_classes)
            modules = [m for m in model.modules() if isinstance(m, classes)]
        else:
            modules = [model]
        for module in modules:
            module.compile(backend=self.backend, mode=self.mode)
        self.compiled = len(modules)
        logger.info("torch.compile (%s, mode %s): %d module(s)", self.backend, self.mode or "default", self.compiled)
        return model

    def describe(self) -> str:
        return f"torch.compile ({self.backend}{', ' + self.mode if self.mode else ''})"
