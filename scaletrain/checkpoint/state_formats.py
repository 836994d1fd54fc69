"""One home per format of a checkpoint's `state/` folder (model and optimizer state), as Lightning's
CheckpointIO: how the training strategy writes and reads it, and how one process reads the whole model
back offline (export, evaluation of a checkpoint). The manifest names the format (`state_format`).

- dcp: torch.distributed.checkpoint, written by fsdp (and by single and ddp with save_async); resharded at
  load by DCP itself.
- hf_trainer: no state folder; HF's model.safetensors and optimizer.pt (single and DDP runs, and
  checkpoints transformers.Trainer wrote).
- deepspeed: the DeepSpeed engine's own files (it writes them: they hold its partitioned optimizer
  state), consolidated offline from their fp32 partitions (zero_to_fp32), so a ZeRO-3 export holds
  the real weights.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp

from .hf_trainer_format import HF_TRAINER_FORMAT, model_weights
from .manager import CheckpointError

DEEPSPEED_TAG = "zero"  # the engine's tag (sub-folder) inside state/


@contextmanager
def quiet_single_process_dcp():
    """DCP warns that it assumes a single process when no process group exists;
    without one that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False),
    which would run any code pickled into them. Inside this context every
    torch.load is weights-only, with the few DeepSpeed classes its files hold
    (ZeRO stage enum, loss scalers, fragment addresses) allowed as plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


class DCPState:
    name = "dcp"

    @staticmethod
    def save(state: dict[str, Any], directory: Path, no_dist: bool = False) -> None:
        """Every rank calls this with its (possibly sharded) state; with `no_dist` one process writes all."""
        with quiet_single_process_dcp():
            dcp.save(state, checkpoint_id=str(directory), no_dist=no_dist)

    @staticmethod
    def save_async(state: dict[str, Any], directory: Path, process_group):
        """Staged in host memory, written in the background; a Future."""
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=process_group)

    @staticmethod
    def load(state: dict[str, Any], directory: Path) -> None:
        """`state` filled in place (resharded to this rank's layout if it differs from the saved one)."""
        with quiet_single_process_dcp():
            dcp.load(state, checkpoint_id=str(directory))

    def full_model(self, directory: Path, model: torch.nn.Module,
                   only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
        """Whole, unsharded weights in one process (no process group: it reads every shard), keyed as in
        `model`; `only` restricts them to those names (a LoRA checkpoint's trained tensors)."""
        wanted = {k: v for k, v in model.state_dict().items() if only is None or k in only}
        state = {"model": wanted}
        self.load(state, directory)
        return state["model"]


def saved_flat_optimizer_state(directory: Path) -> bool:
    """Whether a DCP checkpoint keeps its optimizer state keyed by parameter name (flattened, as pipeline runs
    save it: `optimizer.param_groups.<name>.lr`) rather than by group index (`optimizer.param_groups.0.lr`)."""
    keys = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for key in keys:
        parts = key.split(".")
        if parts[:2] == ["optimizer", "param_groups"] and len(parts) > 2:
            return not parts[2].isdigit()
    return False


class DeepSpeedState:
    name = "deepspeed"

    def full_model(self, directory: Path, model: torch.nn.Module,
                   only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
        """fp32 weights consolidated from the engine's partitions (zero_to_fp32), read weights-only."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                                             exclude_frozen_parameters=only is not None)
        return state if only is None else {k: v for k, v in state.items() if k in only}


class HFFilesState:
    """No state folder: HF's model.safetensors (or adapter) is the model state (single and DDP checkpoints,
    and transformers.Trainer's own)."""
    name = HF_TRAINER_FORMAT

    def full_model(self, directory: Path, model: torch.nn.Module,
                   only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
        weights = model_weights(directory.parent, model)  # `directory` is the absent state folder
        return weights if only is None else {k: v for k, v in weights.items() if k in only}


FORMATS = {fmt.name: fmt for fmt in (DCPState(), DeepSpeedState(), HFFilesState())}


def state_format(manifest: dict[str, Any]):
    """The format a checkpoint's manifest names (dcp for checkpoints written before the key existed)."""
    name = manifest.get("state_format", "dcp")
    if name not in FORMATS:
        raise CheckpointError(f"state_format {name!r} is not one this scaletrain reads ({sorted(FORMATS)}); "
                              "export the checkpoint with the scaletrain version that wrote it")
    return FORMATS[name]
