"""How a run's ranks divide the work: the one owner of the data-parallel degree and rank.

Everything that shards data or normalises by the number of data-parallel replicas asks this object
(sampler and evaluation sharding, batch geometry, loss weights), never the world size: the two differ
as soon as ranks also split the model (tensor, sequence or pipeline parallelism), and then only this
object changes. Today every rank is one data-parallel rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from .environment import DistEnv


@dataclass(frozen=True)
class ParallelLayout:
    env: DistEnv

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: each reads its own shard of every batch."""
        return self.env.world_size

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel index (which shard of the data it reads)."""
        return self.env.rank

    def describe(self) -> str:
        return f"{self.dp_size} data-parallel rank(s)"
