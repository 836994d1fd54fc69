"""`scaletrain export CHECKPOINT OUT_DIR`: a plain Hugging Face folder from any
strategy's checkpoint, in one CPU process, offline.

DCP checkpoints (single, ddp, fsdp) are resharded to one process by DCP itself;
DeepSpeed checkpoints are consolidated from their fp32 partitions
(zero_to_fp32), so a ZeRO-3 export holds the real weights.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from .manager import CheckpointError, CheckpointManager, _quiet_single_process_dcp

logger = logging.getLogger(__name__)


def _model_class(manifest: dict, checkpoint: Path):
    import transformers

    name = manifest.get("model_class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not hasattr(cls, "_from_config"):
        raise CheckpointError(
            f"{checkpoint} was saved from model class {name!r}, which is not a transformers model class; "
            "load its state with the Python API (Trainer + resume_from_checkpoint) instead"
        )
    return cls


def consolidated_state_dict(checkpoint: Path, manifest: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded fp32 weights from the checkpoint's state folder."""
    state_dir = checkpoint / "state"
    if manifest.get("state_format", "dcp") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from ..strategies.deepspeed import CHECKPOINT_TAG, weights_only_loads

        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=CHECKPOINT_TAG)
    state = {"model": model.state_dict()}
    with _quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=str(state_dir))  # no process group: one process reads every shard
    return state["model"]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    checkpoint, out = Path(checkpoint), Path(out_dir)
    manifest = CheckpointManager.read_manifest(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} has no config.json (saved by an older scaletrain, or from a model "
                              "without an HF config); export needs the model's configuration")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    model = _model_class(manifest, checkpoint)._from_config(config)
    state_dict = consolidated_state_dict(checkpoint, manifest, model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    from ..trainer import tied_copy_names

    tied = tied_copy_names(model)
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: the saved weights do not fit {type(model).__name__}: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(str(out))
    except (OSError, ValueError):
        logger.info("%s holds no tokenizer; exported the model only", checkpoint)
    logger.info("exported %s (step %s, %s) to %s", checkpoint, manifest["step"], manifest["strategy"], out)
    return out
