"""The one place that reads the launcher's environment (RANK, WORLD_SIZE, ...).

torchrun, `accelerate launch`, the deepspeed launcher and SLURM+torchrun all
export the same variables, so every launcher looks the same from here on.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def writes_files(self, save_on_each_node: bool) -> bool:
        """Whether this process writes a run's files: the main process, or with save_on_each_node (nodes
        without a shared filesystem) the first process of each node, as HF's should_save."""
        return self.is_local_main if save_on_each_node else self.is_main

    def logs(self, log_on_each_node: bool) -> bool:
        """Whether this process logs at log_level (the others at log_level_replica): the main process,
        or each node's first with log_on_each_node, as HF's should_log."""
        return self.is_local_main if log_on_each_node else self.is_main


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


def launched_rank() -> int:
    """This process's global rank as the launcher set it, 0 when RANK is unset or unreadable."""
    try:
        return _int_env("RANK", 0)
    except ValueError:
        return 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launcher_settings() -> dict[str, Any]:
    """What the launcher asked for, as TrainingArguments field -> value: `accelerate launch
    --use_fsdp/--use_deepspeed` exports its plugin options as environment variables; the ones with an
    FSDP2 or ZeRO meaning are translated. Unsupported requests are returned under "refuse" so that the
    arguments fail when they are made, before any process group starts (args/launcher.py applies them)."""
    settings: dict[str, Any] = {}
    refuse: list[str] = []
    if _flag("ACCELERATE_USE_FSDP"):
        _accelerate_fsdp(settings, refuse)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        _accelerate_deepspeed(settings, refuse)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16"):
        settings[precision] = True
    elif precision != "no":
        refuse.append(f"ACCELERATE_MIXED_PRECISION={precision} (scaletrain does bf16 or fp16; fp8 is not "
                      "supported: launch with --mixed_precision bf16)")
    if refuse:
        settings["refuse"] = refuse
    return settings


def _accelerate_fsdp(settings: dict[str, Any], refuse: list[str]) -> None:
    settings["strategy"] = "fsdp"
    sharding = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if sharding in ("SHARD_GRAD_OP", "2") or os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "").lower() == "false":
        settings["fsdp_reshard_after_forward"] = False
    elif sharding not in ("FULL_SHARD", "1"):
        refuse.append(f"FSDP_SHARDING_STRATEGY={sharding} (scaletrain's FSDP2 does FULL_SHARD or SHARD_GRAD_OP)")
    flags = {"FSDP_OFFLOAD_PARAMS": "fsdp_cpu_offload", "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_low_memory_init",
             "FSDP_ACTIVATION_CHECKPOINTING": "activation_checkpointing"}
    settings.update({field: True for name, field in flags.items() if _flag(name)})
    if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        settings["fsdp_layer_classes"] = [c.strip() for c in os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")]


def _accelerate_deepspeed(settings: dict[str, Any], refuse: list[str]) -> None:
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("1", "2", "3"):
        refuse.append(f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage} (use --zero_stage 1, 2 or 3)")
    settings["strategy"] = f"zero{stage}"
    if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu":
        settings["offload_optimizer"] = True
    if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu":
        settings["offload_params"] = True
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        settings["deepspeed"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]


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


def process_device(env: DistEnv, use_cpu: bool) -> torch.device:
    """This rank's device: its local GPU when there is one (and use_cpu is off), else the CPU."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def start_process_group(env: DistEnv, device: torch.device, backend: str | None, timeout_s: int) -> None:
    """The default process group of a multi-rank run (gloo on CPU, NCCL on GPU unless `backend`
    says otherwise); a no-op when one is running or the run has one rank."""
    if not env.is_distributed or dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    kwargs.update(_restart_safe_store(env, kwargs["timeout"]))
    dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"), **kwargs)
    if dist.get_backend() == "gloo":
        atexit.register(_close_gloo_group_at_exit)


def _close_gloo_group_at_exit() -> None:
    """Scripts written for HF's Trainer never destroy the process group. At interpreter exit gloo's worker thread
    then frees tensors while the interpreter shuts down, and now and then the process aborts ("terminate called
    without an active exception": the HF example-script tests failed so, 2 of about 10 runs). Destroying the
    group first joins that thread; Strategy.teardown does the same for scaletrain's own commands."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        time.sleep(0.2)  # the worker thread frees the works it last waited on, which needs the GIL
        dist.destroy_process_group()


def _restart_safe_store(env: DistEnv, timeout: datetime.timedelta) -> dict[str, Any]:
    """Under torchrun the workers share the agent's store, which outlives a restart: the workers that
    torchrun --max-restarts starts again found their dead predecessors' addresses there and failed to
    connect (most of the time; measured). Each attempt gets keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return {}  # env:// (rank 0 hosts a fresh store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"scaletrain/attempt_{attempt}/", store), "rank": env.rank,
            "world_size": env.world_size}
