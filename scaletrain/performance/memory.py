"""Measuring a rank's memory, on GPU and on CPU.

On CUDA the caching allocator's own counters are used (peak allocated bytes).
A CPU has no such counter, and process RSS is a poor one: glibc keeps freed
memory, so RSS hides what activation checkpointing saves, and it mixes in the
interpreter and libraries. On CPU we therefore count tensor storages exactly:
`TensorPeakTracker` sees every tensor an operator creates (a TorchDispatchMode,
so backward ops and gradients too) and frees it when its storage dies (a weak
reference), giving the same quantity as CUDA's peak allocated memory: the most
tensor bytes alive at once. What existed before (parameters, optimizer state)
is counted separately by `Strategy.held_state_numel`.
"""
from __future__ import annotations

import gc
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value, name: str = "memory size") -> int:
    """'6GiB', '800MB', '1.5 GiB' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a memory size; write e.g. '6GiB', '800MiB' or '2GB'")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be a positive memory size")
    return size


def format_bytes(size: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"


class TensorPeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive.

    Storages are keyed by identity and released by a weak-reference callback,
    so views, in-place ops and tensors autograd saves for backward are counted
    once and for as long as they really live."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        # a DTensor's own storage is an empty wrapper the size of the global tensor; its local tensor holds the
        # rank's bytes
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper tensors: nothing of their own
            return
        key = storage._cdata
        size = storage.nbytes()
        if key in self._live or size == 0:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


class PeakMemory:
    """Context manager: peak bytes allocated on `device` inside it, above what
    was allocated at entry. CUDA: allocator counters; CPU: TensorPeakTracker."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: Optional[int] = None
        self.baseline: Optional[int] = None  # bytes allocated at entry (CUDA only: CPU has no counter)
        self._tracker: Optional[TensorPeakTracker] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = TensorPeakTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.baseline
        else:
            self._tracker.__exit__(*exc)
            self.peak = self._tracker.peak


def device_memory_capacity(device: torch.device) -> Optional[int]:
    """Total memory of an accelerator, or None on CPU (no meaningful limit to infer)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def host_memory_available() -> int:
    """Bytes this process can still allocate on the host: the kernel's MemAvailable, lowered to what the
    process's cgroup (a container, a SLURM job) has left under its limit."""
    available = _meminfo_available()
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room() -> Optional[int]:
    """cgroup v2: memory.max - memory.current of this process's group; None without a limit."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this rank stores."""
    if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 parameter: this rank's partition
        return tensor.ds_tensor
    if isinstance(tensor, DTensor):  # FSDP2: this rank's shard
        return tensor.to_local()
    return tensor


def optimizer_state_bytes_to_come(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state not allocated yet: torch optimizers create it
    at their first step, so a probe before training must add it. Adam(W) keeps
    two moments per element, SGD one with momentum; unknown optimizers are
    assumed to keep two."""
    if isinstance(optimizer, torch.optim.SGD):
        slots = 1 if any(g.get("momentum", 0) for g in optimizer.param_groups) else 0
    else:
        slots = 2
    missing = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not optimizer.state.get(param):
                local = local_shard(param)
                missing += slots * local.numel() * local.element_size()
    return missing


def live_tensor_bytes(device: torch.device, model: Optional[torch.nn.Module] = None) -> int:
    """Bytes of every distinct storage on `device` held by a live Python tensor,
    plus the model's gradients (which may have no Python object yet). Between
    steps this is the rank's model state: parameters, gradients, optimizer
    state and a backend's flat buffers."""
    gc.collect()  # tensors only a dead reference cycle holds are not held
    with warnings.catch_warnings():  # isinstance on some module proxies warns about deprecated names
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    if model is not None:
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
    storages: dict[int, int] = {}
    for found in tensors:
        tensor = local_shard(found)
        if tensor.device.type != device.type or tensor.device.type == "meta":
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        storages.setdefault(storage.data_ptr(), storage.nbytes())
    storages.pop(0, None)  # empty storages share the null pointer
    return sum(storages.values())
