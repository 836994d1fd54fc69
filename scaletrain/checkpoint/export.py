"""`scaletrain export CHECKPOINT OUT_DIR [--merge]`: a plain Hugging Face folder
from any strategy's checkpoint, in one CPU process, offline. A LoRA checkpoint
exports its adapter in peft's format, or with --merge the base model with the
adapter folded in.

The state folder is read whole in this process by its format (checkpoint/state_formats.py): DCP
checkpoints (single, ddp, fsdp) resharded by DCP itself, DeepSpeed ones consolidated from their fp32
partitions, so a ZeRO-3 export holds the real weights.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..modeling import tied_copy_names
from .manager import CheckpointError, CheckpointManager
from .state_formats import state_format

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
    """Full, unsharded fp32 weights from the checkpoint's state folder, whatever format it is in."""
    return state_format(manifest).full_model(checkpoint / "state", model)


def _adapter_state(checkpoint: Path, manifest: dict, adapted: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a LoRA checkpoint (its only model state), keyed as in `adapted`."""
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    return state_format(manifest).full_model(checkpoint / "state", adapted, only=trainable)


def export_adapter(checkpoint: Path, out: Path, manifest: dict, merge: bool, base: str | None) -> Path:
    """A LoRA checkpoint: the adapter in peft's format, or (merge) the base
    model with the adapter folded in, as a plain HF folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    lora_config = LoraConfig.from_pretrained(str(checkpoint))
    base = base or lora_config.base_model_name_or_path
    cls = _model_class(manifest, checkpoint)
    if merge:
        if not base or not Path(base).exists():
            raise CheckpointError(f"{checkpoint} trains a LoRA adapter on base model {base!r}, which is not a "
                                  "local folder here; pass --base PATH_TO_BASE_MODEL to merge into it")
        model = cls.from_pretrained(base, dtype=torch.float32)
    else:  # the adapter alone: the base weights are not needed, only its shapes
        model = cls._from_config(AutoConfig.from_pretrained(str(checkpoint)))
    adapted = get_peft_model(model, lora_config)
    missing, unexpected = adapted.load_state_dict(_adapter_state(checkpoint, manifest, adapted), strict=False)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    if trainable & set(missing) or unexpected:
        raise CheckpointError(f"{checkpoint}: the adapter state does not fit: missing "
                              f"{sorted(trainable & set(missing))[:5]}, unexpected {sorted(unexpected)[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        adapted.merge_and_unload().save_pretrained(str(out))
    else:
        adapted.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, merge: bool = False,
                      base: str | None = None) -> Path:
    checkpoint, out = Path(checkpoint), Path(out_dir)
    manifest = CheckpointManager.read_manifest(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        export_adapter(checkpoint, out, manifest, merge, base)
        _copy_tokenizer(checkpoint, out)
        logger.info("exported the %s of %s to %s", "merged model" if merge else "LoRA adapter", checkpoint, out)
        return out
    if merge:
        raise CheckpointError(f"{checkpoint} holds a full model, not a LoRA adapter: there is nothing to merge; "
                              "export it without --merge")
    model = load_checkpoint_model(checkpoint, manifest)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    _copy_tokenizer(checkpoint, out)
    logger.info("exported %s (step %s, %s) to %s", checkpoint, manifest["step"], manifest["strategy"], out)
    return out


def load_checkpoint_model(checkpoint: Path, manifest: dict) -> torch.nn.Module:
    """The checkpoint's full model with its fp32 weights, in this process, whatever strategy saved it."""
    if (checkpoint / "adapter_config.json").is_file():
        raise CheckpointError(f"{checkpoint} holds a LoRA adapter; write the full model first with scaletrain "
                              f"export {checkpoint} OUT --merge, then use OUT")
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} has no config.json (saved by an older scaletrain, or from a model "
                              "without an HF config); export needs the model's configuration")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    model = _model_class(manifest, checkpoint)._from_config(config)
    state_dict = consolidated_state_dict(checkpoint, manifest, model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = tied_copy_names(model)
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: the saved weights do not fit {type(model).__name__}: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


def _copy_tokenizer(checkpoint: Path, out: Path) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(str(out))
    except (OSError, ValueError):
        logger.info("%s holds no tokenizer; exported the model only", checkpoint)
