from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from ..distributed import DistEnv
from .base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    """Replicated model, gradients all-reduced (averaged) by DistributedDataParallel."""

    name = "ddp"

    @classmethod
    def check_environment(cls, env: DistEnv) -> None:
        if not env.is_distributed:
            return  # a world of one is legal (and useful for tests); DDP just has no peers

    def setup_environment(self) -> None:
        super().setup_environment()
        if not self.env.is_distributed and not torch.distributed.is_initialized():
            # DDP needs a process group even alone; a private one-rank group keeps
            # the single-process launch path identical to the multi-rank one.
            torch.distributed.init_process_group(
                backend="gloo" if self.device.type == "cpu" else "nccl",
                store=torch.distributed.HashStore(),
                rank=0,
                world_size=1,
            )

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
