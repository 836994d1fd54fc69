"""Every random number generator a run draws from (Python, NumPy, torch, CUDA), captured and restored
as one value: checkpoints save it per rank, and the data loader and batch finder put it back after
work that must not shift the training stream.

Checkpoints hold it in HF's Trainer layout (keys python/numpy/cpu/cuda; `rng_state.pth` in a one-process
run, `rng_state_<rank>.pth` otherwise), so a checkpoint moves between transformers.Trainer and scaletrain
with its random streams. Files written by earlier scaletrain versions (key "torch", tensors for the
Python and NumPy states) still load."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers.trainer_pt_utils import safe_globals


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:  # the layout of scaletrain checkpoints before they followed HF's
        _restore_tensor_layout(state)
    else:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # HF's one-process runs save the current device's state alone, distributed ones every device's
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, (list, tuple)) else torch.cuda.set_rng_state(cuda)


def _restore_tensor_layout(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])


def rng_file_name(rank: int, world_size: int) -> str:
    """HF's names: one process writes rng_state.pth, each rank of a distributed run its own."""
    return "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth"


def saved_rng_state(folder: Path, rank: int, saved_world_size: int) -> Optional[dict[str, Any]]:
    """This rank's saved streams, or None where the checkpoint has none for it. Loaded weights-only,
    with NumPy's state types allowed as HF allows them."""
    names = [rng_file_name(rank, saved_world_size), f"rng_state_{rank}.pth"]
    found = next((folder / name for name in names if (folder / name).is_file()), None)
    if found is None:
        return None
    with safe_globals():
        return torch.load(found, weights_only=True)
