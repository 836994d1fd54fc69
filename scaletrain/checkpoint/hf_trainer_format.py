"""transformers.Trainer's checkpoint files, read and written, so a run moves between the two trainers.

Written by scaletrain: a strategy that keeps the whole state on every rank (single process, DDP) saves
exactly HF's files: model.safetensors (the model state), optimizer.pt (torch's index-keyed
`optimizer.state_dict()`, HF's parameter grouping), scheduler.pt, rng_state*.pth, trainer_state.json and
training_args.bin, plus its own progress.json and manifest. transformers.Trainer resumes such a folder as
its own, and a sharding strategy resumes it (resharding at load).

Read by scaletrain: a checkpoint-N folder written by transformers.Trainer (trainer_state.json, no
manifest) resumes under every strategy that loads through torch's state-dict API (single, DDP, FSDP,
HSDP): the weights from its safetensors (or pytorch_model.bin, or a peft adapter), the optimizer from
optimizer.pt mapped index -> parameter name through this run's own optimizer, which groups parameters as
HF's does, and the data position from its global step as HF computes it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from ..errors import CheckpointError
from ..modeling import adapter_config, tied_copy_names
from .hf_weights import ADAPTER_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
HF_TRAINER_FORMAT = "hf_trainer"
PICKLED_WEIGHTS_NAME = "pytorch_model.bin"
_RNG_RANK = re.compile(r"^rng_state_(\d+)\.pth$")


def looks_like_hf_trainer_checkpoint(path: Path) -> bool:
    """A folder transformers.Trainer wrote: its trainer state, none of scaletrain's own bookkeeping."""
    return (path / TRAINER_STATE_FILE).is_file() and not (path / "manifest.json").exists()


def hf_trainer_manifest(path: Path, format_version: int) -> dict[str, Any]:
    """What scaletrain's manifest would say of an HF Trainer checkpoint; raises for those it cannot read."""
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    if any(path.glob("pytorch_model_fsdp_*")) or any(path.glob("global_step*")):
        raise CheckpointError(
            f"{path} was written by transformers.Trainer under FSDP or DeepSpeed (accelerate's sharded files); "
            "scaletrain continues HF checkpoints holding whole weights (one process or DDP). Export it with "
            "transformers first (Trainer.save_model), then start a scaletrain run from those weights")
    hf_weight_file(path)  # refuses a folder without weights
    ranks = [int(m.group(1)) for f in path.glob("rng_state_*.pth") if (m := _RNG_RANK.match(f.name))]
    return {
        "format_version": format_version, "step": int(state["global_step"]), "strategy": "transformers.Trainer",
        "state_format": HF_TRAINER_FORMAT, "world_size": max(ranks) + 1 if ranks else 1,
        "includes_optimizer": (path / OPTIMIZER_FILE).is_file(), "optimizer_file": OPTIMIZER_FILE,
    }


def hf_trainer_progress(path: Path) -> dict[str, Any]:
    """The data position HF records: a global step (placed in the epoch once the run plan is known) and the
    per-device batch it was trained with."""
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    return {"global_step": int(state["global_step"]), "per_device_train_batch_size": state.get("train_batch_size")}


def position_from_global_step(global_step: int, updates_per_epoch: Optional[int], accumulation: int
                              ) -> dict[str, int]:
    """Epoch and micro-batches consumed in it, as transformers.Trainer derives them on resume."""
    if not updates_per_epoch:  # a stream: HF skips global_step x accumulation batches of its one pass
        return {"epoch": 0, "micro_batches_in_epoch": global_step * accumulation}
    return {"epoch": global_step // updates_per_epoch,
            "micro_batches_in_epoch": (global_step % updates_per_epoch) * accumulation}


# ----------------------------------------------------------------------------------------------- weights
def hf_weight_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, ADAPTER_WEIGHTS_NAME, PICKLED_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds no model weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, "
                            f"{ADAPTER_WEIGHTS_NAME} or {PICKLED_WEIGHTS_NAME}): it cannot be resumed")


def weights_resharded(folder: Path, recorded: dict[str, int]) -> set[str]:
    """The recorded weight files a complete other layout replaces (HF's tooling re-shards a checkpoint's
    model.safetensors into shards + index, or back); empty when the recorded ones are still the weights."""
    weights = {name for name in recorded if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name)}
    if not weights or all((folder / name).is_file() for name in weights):
        return set()
    index = folder / WEIGHTS_INDEX_NAME
    if (folder / WEIGHTS_NAME).is_file() and WEIGHTS_NAME not in weights:
        return weights
    if index.is_file() and WEIGHTS_INDEX_NAME not in weights:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return weights if all((folder / shard).is_file() for shard in shards) else set()
    return set()


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.name == WEIGHTS_INDEX_NAME:
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(file.parent / shard)).items()}
    if file.suffix == ".bin":
        return torch.load(file, map_location="cpu", weights_only=True)
    return load_file(str(file))


def _adapter_keys_to_model(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft saves adapter tensors without the adapter's name (lora_A.weight for lora_A.default.weight)."""
    name = getattr(model, "active_adapter", "default")
    ours = {key.replace(f".{name}.", "."): key for key in model.state_dict()}
    missing = sorted(set(saved) - set(ours))
    if missing:
        raise CheckpointError(f"the checkpoint's adapter holds {missing[:3]}..., which this model's adapter "
                                "has not: resume with the LoRA settings the checkpoint was trained with")
    return {ours[key]: tensor for key, tensor in saved.items()}


def model_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The folder's weights keyed as `model`'s state dict (an adapter's with its adapter name)."""
    saved = _read_weights(hf_weight_file(folder))
    return _adapter_keys_to_model(model, saved) if adapter_config(model) is not None else saved


def load_hf_model(folder: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model` (unwrapped; its parameters may be sharded DTensors: torch's
    full-state-dict loading scatters them). Every name must be there but a tied copy, or a frozen base
    weight under an adapter."""
    saved = model_weights(folder, model)
    adapted = adapter_config(model) is not None
    expected = set(model.state_dict())
    unexpected = sorted(set(saved) - expected)
    optional = tied_copy_names(model) | ({n for n, p in model.named_parameters() if not p.requires_grad}
                                         if adapted else set())
    missing = sorted(expected - set(saved) - optional)
    if unexpected or missing:
        raise CheckpointError(f"{folder}'s weights do not fit this model: missing {missing[:5]}, unexpected "
                                f"{unexpected[:5]}. Resume with the model the checkpoint was trained from")
    if any(isinstance(t, DTensor) for t in model.state_dict().values()):
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
    else:  # whole tensors: the model's own load_state_dict, as HF loads (a model may override it)
        model.load_state_dict(saved, strict=False)


# --------------------------------------------------------------------------------------------- optimizer
def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each parameter group's parameter names, in the order optimizer.state_dict() numbers them."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def write_optimizer_file(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)


def load_optimizer_file(file: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """optimizer.pt (index-keyed, as transformers.Trainer and single/DDP scaletrain runs write it) into this
    run's optimizer, whatever its sharding: the indices become parameter names through this optimizer's
    own grouping, and torch's full-state-dict loading places each rank's part."""
    saved = torch.load(file, map_location="cpu", weights_only=True)
    # HF keeps a group with no parameters (no-decay under LoRA); this optimizer was built without it
    saved["param_groups"] = [group for group in saved["param_groups"] if group["params"]]
    groups = optimizer_parameter_names(model, optimizer)
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    if saved_sizes != [len(names) for names in groups]:
        raise CheckpointError(
            f"{file} holds parameter groups of {saved_sizes} parameters; this run's optimizer has "
            f"{[len(names) for names in groups]}. Resume with the optimizer, weight decay and trainable "
            "parameters (LoRA settings) the checkpoint was trained with")
    name_at = {index: name for group, names in zip(saved["param_groups"], groups, strict=True)
               for index, name in zip(group["params"], names, strict=True)}
    _check_state_shapes(file, saved["state"], name_at, dict(model.named_parameters()))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not saved["state"] or not any(isinstance(p, DTensor) for p in params):
        optimizer.load_state_dict(saved)  # whole parameters (or no per-parameter state): the file as it is
        return
    by_name = {"state": {name_at[index]: state for index, state in saved["state"].items()},
               "param_groups": [{**group, "params": [name_at[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _check_state_shapes(file: Path, state: dict, name_at: dict[int, str], params: dict[str, torch.Tensor]) -> None:
    for index, entries in state.items():
        shape = params[name_at[index]].shape  # a DTensor reports its global shape
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != shape:
                raise CheckpointError(
                    f"{file}: the optimizer's {key} for {name_at[index]} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(shape)}. Resume with the model and parameter grouping it was trained with")
