"""The one place that reads the launcher's environment (RANK, WORLD_SIZE, ...).

torchrun, `accelerate launch`, the deepspeed launcher and SLURM+torchrun all
export the same variables, so every launcher looks the same from here on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from exc


def read_env() -> DistEnv:
    world_size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world_size = _int_env("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher")
    return DistEnv(rank, world_size, local_rank, local_world_size)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(env: DistEnv, requested: int | None) -> int:
    """Give each local rank its share of the cores.

    Several ranks each using every core oversubscribe the CPU (measured 5x
    slower with 2 ranks x 2 threads on 2 cores). An explicit request, or an
    OMP_NUM_THREADS chosen by the user or launcher, wins.
    """
    if requested is not None:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        threads = _int_env("OMP_NUM_THREADS", 1)
    else:
        threads = max(1, available_cores() // max(1, env.local_world_size))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
