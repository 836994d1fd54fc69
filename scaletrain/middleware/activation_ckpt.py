"""Activation checkpointing: keep only each block's input in the forward and
recompute the block in backward. `selective: true` (torchtitan's per-op
policy) keeps more: every other matmul's output and the attention kernel's,
recomputing only the rest of the block (norms, activations, the other matmuls):
less memory than none, less recompute than all.

Always non-reentrant: reentrant checkpointing runs backward twice through the
same parameters, which DDP reports as "marked ready twice" and which loses
gradients when the block's inputs do not require grad (a frozen base under
LoRA). Applied before the strategy wraps the model, so under FSDP2 the
recompute sits inside each sharded unit, whose pre-backward hook has gathered
the parameters by then.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import NotSupportedError
from ..modeling import block_classes
from .base import Middleware

logger = logging.getLogger(__name__)
_KNOWN_KWARGS = ("every_n_layers", "use_reentrant", "offload", "preserve_rng_state", "determinism_check", "selective")


def check_options(args) -> None:
    kwargs = args.activation_checkpointing_kwargs
    if kwargs and not args.activation_checkpointing:
        raise ValueError("activation_checkpointing_kwargs is set but activation_checkpointing is off; set "
                         "activation_checkpointing: true")
    if kwargs is None:
        return
    unknown = set(kwargs) - set(_KNOWN_KWARGS)
    if unknown:
        raise ValueError(f"activation_checkpointing_kwargs has unknown keys {sorted(unknown)}; known: "
                         f"{', '.join(_KNOWN_KWARGS)}")
    if kwargs.get("use_reentrant"):
        raise NotSupportedError(
            "activation_checkpointing_kwargs use_reentrant=True is not supported: reentrant checkpointing "
            "breaks DDP ('marked ready twice') and frozen-base LoRA; remove it (non-reentrant is used)")
    if not isinstance(kwargs.get("selective", False), bool):
        raise ValueError(f"activation_checkpointing_kwargs selective={kwargs['selective']!r} must be true or false")
    every = kwargs.get("every_n_layers", 1)
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"activation_checkpointing_kwargs every_n_layers={every!r} must be an integer >= 1")


def every_and_selective(args) -> tuple[int, bool]:
    """(every_n_layers, selective) of args.activation_checkpointing_kwargs, defaults filled in (for the memory
    estimates; whether checkpointing is on at all is args.activation_checkpointing)."""
    kwargs = args.activation_checkpointing_kwargs or {}
    return int(kwargs.get("every_n_layers", 1)), bool(kwargs.get("selective", False))


class ActivationCheckpointing(Middleware):
    name = "activation_checkpointing"

    def __init__(self, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        self.every_n_layers = int(kwargs.pop("every_n_layers", 1))
        self.offload = bool(kwargs.pop("offload", False))
        self.selective = bool(kwargs.pop("selective", False))
        self.checkpoint_kwargs = {**kwargs, "use_reentrant": False}
        if self.selective:
            self.checkpoint_kwargs["context_fn"] = selective_context
        self.checkpointed = 0

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        if self.offload and strategy.device.type != "cuda":
            raise ValueError("activation_checkpointing_kwargs offload=True moves saved activations to pinned host "
                             "memory and needs a GPU; on CPU they already are in host memory: drop offload")
        if callable(getattr(model, "activation_checkpointing_enable", None)) and \
                getattr(model, "supports_gradient_checkpointing", False):
            # transformers' own layer hook: handles use_cache and input grads
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=self.checkpoint_kwargs,
                                                  every_n_layers=self.every_n_layers, offload=self.offload)
            flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
            # layers that checkpoint themselves, or (a model that checkpoints in its own forward, as custom
            # PreTrainedModels written before GradientCheckpointingLayer do) the model itself
            self.checkpointed = sum(1 for m in flagged if type(m).__name__ != type(model).__name__) or len(flagged)
        else:
            if self.offload:
                raise ValueError(f"activation checkpointing offload needs a transformers model; "
                                 f"{type(model).__name__} is not one")
            self.checkpointed = self._wrap_blocks(model)
        if not self.checkpointed:
            raise ValueError(f"activation checkpointing found no transformer blocks to checkpoint in "
                             f"{type(model).__name__}; set fsdp_layer_classes to its block class")
        logger.info("activation checkpointing: %d blocks (every %d)", self.checkpointed, self.every_n_layers)
        return model

    def _wrap_blocks(self, model: torch.nn.Module) -> int:
        """For models without transformers' hook: checkpoint the forward of every
        k-th repeated block. The instance's `forward` is replaced, so parameter
        names (and therefore checkpoints) do not change."""
        classes = block_classes(model)
        blocks = [m for m in model.modules() if isinstance(m, classes)]
        chosen = blocks[:: self.every_n_layers]
        for block in chosen:
            block.forward = _checkpointed(block, block.forward, self.checkpoint_kwargs)
        return len(chosen)

    def describe(self) -> str:
        return f"{'selective ' if self.selective else ''}activation checkpointing (every {self.every_n_layers})"


def _checkpointed(module: torch.nn.Module, forward, kwargs: dict[str, Any]):
    @functools.wraps(forward)
    def run(*args, **kw):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, **kwargs, **kw)
        return forward(*args, **kw)

    return run


# the ops whose outputs selective checkpointing keeps (torchtitan's list, with the CPU attention kernel):
# matmuls (every other one), attention kernels, and a reduce-scatter's result
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops._c10d_functional.reduce_scatter_tensor.default}
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def selective_context():
    """A fresh policy per checkpointed call: counts matmuls separately in the forward and in the recompute,
    so both make the same choices."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    counts = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs):
        if func in _MATMULS:
            counts[ctx.is_recompute] += 1
            if counts[ctx.is_recompute] % 2 == 0:  # every second matmul is recomputed
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
