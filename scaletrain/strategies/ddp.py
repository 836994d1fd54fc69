from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from transformers import PreTrainedModel

from ..modeling import library_model
from .base import OptimizerFactory, Strategy


def _find_unused_parameters(model: torch.nn.Module, args) -> bool:
    """HF's default when ddp_find_unused_parameters is unset: on for a transformers model unless it
    checkpoints activations, on for any other module. Parameters that get no gradient (a warm-started
    encoder-decoder's encoder pooler) would otherwise stop DDP's reduction at the first step."""
    if args.ddp_find_unused_parameters is not None:
        return bool(args.ddp_find_unused_parameters)
    model = library_model(model)
    if isinstance(model, PreTrainedModel):
        return not (model.is_activation_checkpointing or args.activation_checkpointing)
    return True


class DDPStrategy(Strategy):
    """Replicated model, gradients all-reduced (averaged) by DistributedDataParallel."""

    name = "ddp"
    needs_process_group = True
    _static_graph_recorded = False  # with ddp_static_graph: after the first backward

    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        model = model.to(self.device)
        args = self.args
        kwargs = {"find_unused_parameters": _find_unused_parameters(model, args)}
        if args.ddp_bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = args.ddp_bucket_cap_mb
        if args.ddp_broadcast_buffers is not None:
            kwargs["broadcast_buffers"] = args.ddp_broadcast_buffers
        if args.ddp_static_graph is not None:
            kwargs["static_graph"] = args.ddp_static_graph
        # gradients are views into the all-reduce buckets: one copy of the gradients instead of two
        kwargs["gradient_as_bucket_view"] = args.ddp_gradient_as_bucket_view
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, **kwargs)
        return wrapped, optimizer_factory(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: torch.nn.Module):
        if not isinstance(model, DistributedDataParallel):
            return super().no_sync(model)
        if model.static_graph and not self._static_graph_recorded:
            # a static graph is recorded by the first backward, which must reduce (torch asserts
            # `expect_autograd_hooks_` otherwise); later micro-steps add local gradients to the
            # reduced ones, and the step's reduction averages them: the same mean gradient
            self._static_graph_recorded = True
            return contextlib.nullcontext()
        return model.no_sync()
