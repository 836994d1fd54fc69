from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    """Replicated model, gradients all-reduced (averaged) by DistributedDataParallel."""

    name = "ddp"
    needs_process_group = True

    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        model = model.to(self.device)
        args = self.args
        kwargs = {}
        if args.ddp_find_unused_parameters is not None:
            kwargs["find_unused_parameters"] = args.ddp_find_unused_parameters
        if args.ddp_bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = args.ddp_bucket_cap_mb
        if args.ddp_broadcast_buffers is not None:
            kwargs["broadcast_buffers"] = args.ddp_broadcast_buffers
        if args.ddp_static_graph is not None:
            kwargs["static_graph"] = args.ddp_static_graph
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, **kwargs)
        return wrapped, optimizer_factory(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: torch.nn.Module):
        return model.no_sync() if isinstance(model, DistributedDataParallel) else super().no_sync(model)
