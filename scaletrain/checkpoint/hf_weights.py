"""Model weights in Hugging Face's layout (model.safetensors, or shards with model.safetensors.index.json),
written from any strategy one tensor at a time: the strategy yields each full tensor in turn (gathering a
sharded one on every rank as it goes) and the writing process keeps at most one shard in memory, never the
whole model. A checkpoint-N folder written this way opens with `from_pretrained`, as HF's does."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MAX_SHARD_BYTES = 5 * 2**30  # HF's default max_shard_size ("5GB")


def write_hf_weights(folder: Path, tensors: Iterable[tuple[str, Optional[torch.Tensor]]], writes: bool,
                     skip: frozenset[str] = frozenset(), max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every rank consumes `tensors` (its gathers are collectives); the rank that `writes` gets the full
    tensors and saves them in shards of at most `max_shard_bytes` (one file when they all fit). Names in
    `skip` (the second name of a tied weight) are left out, as save_pretrained leaves them out."""
    shard: dict[str, torch.Tensor] = {}
    shard_of: dict[str, int] = {}  # tensor name -> shard number
    number, size, total = 1, 0, 0
    for name, tensor in tensors:
        if not writes or name in skip:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            _save_part(folder, number, shard)
            number, size = number + 1, 0
        shard[name], shard_of[name] = tensor.contiguous(), number
        size += nbytes
        total += nbytes
    if not writes:
        return
    count = number
    if count == 1:
        save_file(shard, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    _save_part(folder, count, shard)
    names = {part: f"model-{part:05d}-of-{count:05d}.safetensors" for part in range(1, count + 1)}
    for part, final in names.items():
        os.replace(folder / _part_name(part), folder / final)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[part] for name, part in sorted(shard_of.items())}}
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))


def _part_name(number: int) -> str:
    return f"model-{number:05d}.safetensors.part"  # renamed once the number of shards is known


def _save_part(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / _part_name(number)), metadata={"format": "pt"})
    tensors.clear()  # the shard is on disk: its memory goes back


def write_adapter_weights(folder: Path, model: torch.nn.Module,
                          tensors: Iterable[tuple[str, Optional[torch.Tensor]]], writes: bool,
                          adapter_keys: Optional[dict[str, str]] = None) -> None:
    """A LoRA model's trained tensors (`tensors` holds just those) in peft's adapter_model.safetensors (the
    adapter config is written beside it), so PeftModel.from_pretrained(base, checkpoint) opens it.
    `adapter_keys`: each tensor's key in the file, where `model` lacks some of the adapted layers (a pipeline
    rank's stages: peft finds the keys from the model's own layers)."""
    from peft import get_peft_model_state_dict

    collected = {name: tensor for name, tensor in tensors if writes}
    if writes:
        adapter = get_peft_model_state_dict(model, state_dict=collected) if adapter_keys is None else \
            {adapter_keys[name]: tensor for name, tensor in collected.items() if name in adapter_keys}
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / ADAPTER_WEIGHTS_NAME),
                  metadata={"format": "pt"})
