"""How a run's ranks divide the work: the one owner of the layout (torchtitan's ParallelDims).

Built from TrainingArguments.parallelism_config and the launch before any process group: the sizes of
dp_replicate (replicas of the model), dp_shard (ranks a replica's state is sharded over), sp (ranks a row's
sequence is split over: Ulysses) and tp (ranks a layer is split over), validated against the world size.
Everything that shards data or normalises by the number of data-parallel replicas asks this object (sampler
and evaluation sharding, batch geometry, loss weights), never the world size; the strategies ask it for their
device mesh. Ranks are laid out (dp_replicate, dp_shard, sp, tp): tp innermost (a layer's ranks stay inside a
node), sp next (its all-to-all is the next busiest), dp_replicate outermost (replicas span nodes).

The sp ranks of a data-parallel rank read the same rows and each trains on one slice of every row's
sequence, so for gradients and losses they count as data-parallel ranks: FSDP shards over dp_shard x sp (as
torchtitan shards over dp_shard x cp), and gradients are averaged over every rank of a tp position
(`batch_ranks` of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .environment import DistEnv


@dataclass(frozen=True)
class ParallelLayout:
    env: DistEnv
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: int = 1
    pp: int = 1  # pipeline stages (outermost: a stage's ranks hold one part of the model, its data-parallel
    # ranks, sequence and tensor slices inside it)

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
    def batch_ranks(self) -> int:
        """The ranks a step's targets are divided among, and its gradients averaged over: dp x sp."""
        return self.dp_size * self.sp

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel index (which shard of the data it reads); the pp, sp and tp ranks of
        a data-parallel rank share one."""
        return self.env.rank // (self.sp * self.tp) % self.dp_size

    @property
    def pp_rank(self) -> int:
        """Which pipeline part this rank holds (the stages of that part, with interleaving several)."""
        return self.env.rank // self.ranks_per_part

    @property
    def ranks_per_part(self) -> int:
        """The ranks of one pipeline part (all of them without pp): dp x sp x tp."""
        return self.dp_size * self.sp * self.tp

    @property
    def rank_in_part(self) -> int:
        return self.env.rank % self.ranks_per_part

    @property
    def sp_rank(self) -> int:
        """Which slice of each row's sequence this rank trains on."""
        return self.env.rank // self.tp % self.sp

    def world_mesh(self, device_type: str):
        """Every rank on one (pp, dp_replicate, dp_shard, sp, tp) DeviceMesh, made once (its sub-meshes' process
        groups are made with it); after the process group starts."""
        return self._meshes(device_type)["world"]

    def _meshes(self, device_type: str) -> dict:
        """This process's meshes by name, the world mesh made on first use."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        key = (self, device_type, dist.distributed_c10d._get_default_group())  # a restarted group: a new mesh
        if key not in _MESHES:
            _MESHES.clear()
            _MESHES[key] = {"world": init_device_mesh(
                device_type, (self.pp, self.dp_replicate, self.dp_shard, self.sp, self.tp),
                mesh_dim_names=("pp", "dp_replicate", "dp_shard", "sp", "tp"))}
        return _MESHES[key]

    def _derived_mesh(self, device_type: str, name: str, build):
        """A mesh made from the world mesh once and kept (torch asks callers to keep flattened meshes)."""
        meshes = self._meshes(device_type)
        if name not in meshes:
            meshes[name] = build(meshes["world"])
        return meshes[name]

    def fsdp_mesh(self, device_type: str):
        """The mesh FSDP2 shards over: (dp_shard x sp,) or, with replicas, (dp_replicate, dp_shard x sp): HSDP."""
        if self.sp == 1:
            mesh = self.world_mesh(device_type)
            return mesh["dp_shard"] if self.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
        if self.dp_replicate == 1:
            return self._derived_mesh(device_type, "dp_shard_sp", lambda w: w["dp_shard", "sp"]._flatten("dp_shard_sp"))
        return self._derived_mesh(device_type, "hsdp", self._hsdp_over_sp)

    def _hsdp_over_sp(self, world):
        """(dp_replicate, dp_shard x sp) as a 2-D mesh: FSDP2's HSDP mesh when sp ranks shard too."""
        flat = world["dp_replicate", "dp_shard", "sp"]._flatten("batch_for_hsdp")
        if hasattr(flat, "_unflatten"):  # torch >= 2.9: built from a flattened mesh, as torch now asks
            return flat._unflatten(0, (self.dp_replicate, self.dp_shard * self.sp), ("dp_replicate", "dp_shard_sp"))
        world["dp_shard", "sp"]._flatten("dp_shard_sp")  # older torch: the flattened dimension sliced from the root
        return world["dp_replicate", "dp_shard_sp"]

    def batch_mesh(self, device_type: str):
        """Every rank of this rank's tp position (dp x sp), as one flat mesh dimension: the ranks that divide a
        step's targets and average its gradients."""
        return self._derived_mesh(device_type, "batch",
                                  lambda w: w["dp_replicate", "dp_shard", "sp"]._flatten("batch"))

    def pp_mesh(self, device_type: str):
        return self.world_mesh(device_type)["pp"]

    def sp_mesh(self, device_type: str):
        return self.world_mesh(device_type)["sp"]

    def tp_mesh(self, device_type: str):
        return self.world_mesh(device_type)["tp"]

    def as_dict(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "sp": self.sp,
                "tp": self.tp}

    def describe(self) -> str:
        return describe_sizes(self.dp_replicate, self.dp_shard, self.tp, alone="1 rank", sp=self.sp, pp=self.pp)


_MESHES: dict = {}  # (layout, device type, group) -> its meshes by name: one layout per process


def layout_sizes(config, world: int) -> tuple[int, int, int, int, int]:
    """(dp_replicate, dp_shard, tp, sp, pp) that a ParallelismConfig lays out on `world` ranks (-1: the rest); a
    product that is not `world` is refused naming every size."""
    sizes = {"dp_replicate_size": config.dp_replicate_size, "dp_shard_size": config.dp_shard_size,
             "tp_size": config.tp_size, "sp_size": config.sp_size, "pp_size": config.pp_size}
    known = 1
    for value in sizes.values():
        known *= value if value != -1 else 1
    free = [name for name, value in sizes.items() if value == -1]
    if free:
        if world % known:
            raise ValueError(f"parallelism_config {_spelled(sizes)}: {world} ranks are not a multiple of "
                             f"{known}; launch a multiple of {known} ranks or set every size")
        sizes[free[0]] = world // known
    product = math.prod(sizes.values())
    if product != world:
        raise ValueError(f"parallelism_config {_spelled(sizes)} lays out {product} ranks, but this launch has "
                         f"{world}; make the product {world} (or set one data-parallel size to -1: the rest)")
    return (sizes["dp_replicate_size"], sizes["dp_shard_size"], sizes["tp_size"], sizes["sp_size"],
            sizes["pp_size"])


def describe_sizes(dp_replicate: int, dp_shard: int, tp: int, alone: str, sp: int = 1, pp: int = 1) -> str:
    """'2 pp x 2 dp_replicate x 4 dp_shard x 2 sp x 2 tp' (sizes of 1 left out; `alone` when all are)."""
    parts = [f"{size} {name}" for name, size in (("pp", pp), ("dp_replicate", dp_replicate), ("dp_shard", dp_shard),
                                                    ("sp", sp), ("tp", tp)) if size > 1]
    return " x ".join(parts) if parts else alone


def _spelled(sizes: dict[str, Optional[int]]) -> str:
    return " x ".join(f"{name}={value}" for name, value in sizes.items())
