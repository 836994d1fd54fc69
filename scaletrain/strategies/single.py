from __future__ import annotations

import torch

from ..parallel.environment import DistEnv
from .base import OptimizerFactory, Strategy


class SingleDeviceStrategy(Strategy):
    """One process, one device: no process group, no wrapping."""

    name = "single"
    replicates_optimizer = True

    @classmethod
    def check_environment(cls, env: DistEnv) -> None:
        if env.is_distributed:
            raise ValueError(
                f"strategy='single' was asked for under a launcher with WORLD_SIZE={env.world_size}; "
                "every rank would train its own copy. Use strategy: ddp (or auto), or launch one process"
            )

    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        model = model.to(self.device)
        return model, optimizer_factory(model)
