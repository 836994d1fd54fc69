"""How a run's ranks divide the work: the one owner of the layout (torchtitan's ParallelDims).

Built from TrainingArguments.parallelism_config and the launch before any process group: the sizes of
dp_replicate (replicas of the model), dp_shard (ranks a replica's state is sharded over) and tp (ranks a
layer is split over), validated against the world size. Everything that shards data or normalises by the
number of data-parallel replicas asks this object (sampler and evaluation sharding, batch geometry, loss
weights), never the world size; the strategies ask it for their device mesh. Ranks are laid out with tp
innermost (a layer's ranks stay inside a node) and dp_replicate outermost (replicas span nodes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .environment import DistEnv


@dataclass(frozen=True)
class ParallelLayout:
    env: DistEnv
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def resolve(cls, env: DistEnv, config) -> "ParallelLayout":
        """The layout `config` (a scaletrain ParallelismConfig, or None: every rank one data-parallel rank)
        asks for on this launch; a product that is not the world size is refused naming every size."""
        if config is None:
            return cls(env, 1, env.world_size, 1)
        return cls(env, *layout_sizes(config, env.world_size))

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: each reads its own shard of every batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel index (which shard of the data it reads); tp ranks share one."""
        return self.env.rank // self.tp

    def world_mesh(self, device_type: str):
        """Every rank on one (dp_replicate, dp_shard, tp) DeviceMesh, made once (its sub-meshes' process
        groups are made with it); after the process group starts."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        key = (self, device_type, dist.distributed_c10d._get_default_group())  # a restarted group: a new mesh
        if key not in _MESHES:
            _MESHES.clear()
            _MESHES[key] = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp),
                                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        return _MESHES[key]

    def fsdp_mesh(self, device_type: str):
        """The mesh FSDP2 shards over: (dp_shard,) or, with replicas, (dp_replicate, dp_shard): HSDP."""
        mesh = self.world_mesh(device_type)
        return mesh["dp_shard"] if self.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]

    def dp_mesh(self, device_type: str):
        """Every data-parallel rank of this rank's tp position, as one flat mesh dimension."""
        mesh = self.world_mesh(device_type)
        if self.dp_replicate == 1 or self.dp_shard == 1:
            return mesh["dp_shard" if self.dp_replicate == 1 else "dp_replicate"]
        return mesh["dp_replicate", "dp_shard"]._flatten("dp")

    def tp_mesh(self, device_type: str):
        return self.world_mesh(device_type)["tp"]

    def as_dict(self) -> dict[str, int]:
        return {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}

    def describe(self) -> str:
        return describe_sizes(self.dp_replicate, self.dp_shard, self.tp, alone="1 rank")


_MESHES: dict = {}  # (layout, device type) -> its DeviceMesh: one per process


def layout_sizes(config, world: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) that a ParallelismConfig lays out on `world` ranks (-1: the rest); a
    product that is not `world` is refused naming every size."""
    sizes = {"dp_replicate_size": config.dp_replicate_size, "dp_shard_size": config.dp_shard_size,
             "tp_size": config.tp_size}
    known = 1
    for value in sizes.values():
        known *= value if value != -1 else 1
    free = [name for name, value in sizes.items() if value == -1]
    if free:
        if world % known:
            raise ValueError(f"parallelism_config {_spelled(sizes)}: {world} ranks are not a multiple of "
                             f"{known}; launch a multiple of {known} ranks or set every size")
        sizes[free[0]] = world // known
    product = sizes["dp_replicate_size"] * sizes["dp_shard_size"] * sizes["tp_size"]
    if product != world:
        raise ValueError(f"parallelism_config {_spelled(sizes)} lays out {product} ranks, but this launch has "
                         f"{world}; make the product {world} (or set one data-parallel size to -1: the rest)")
    return sizes["dp_replicate_size"], sizes["dp_shard_size"], sizes["tp_size"]


def describe_sizes(dp_replicate: int, dp_shard: int, tp: int, alone: str) -> str:
    """'2 dp_replicate x 4 dp_shard x 2 tp' (sizes of 1 left out; `alone` when all are)."""
    parts = [f"{size} {name}" for name, size in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard),
                                                    ("tp", tp)) if size > 1]
    return " x ".join(parts) if parts else alone


def _spelled(sizes: dict[str, Optional[int]]) -> str:
    return " x ".join(f"{name}={value}" for name, value in sizes.items())
