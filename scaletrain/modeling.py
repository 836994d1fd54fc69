"""Facts about a model's structure that several features need (FSDP units,
activation checkpointing, the memory estimator)."""
from __future__ import annotations

from typing import Optional

import torch


def block_classes(model: torch.nn.Module, names: Optional[list[str]] = None) -> tuple[type, ...]:
    """The transformer block classes of `model`: `names` if given (the
    fsdp_layer_classes argument), else the model's `_no_split_modules`, else the
    class of its largest list of identical modules."""
    source = "fsdp_layer_classes"
    if not names:
        names = list(getattr(model, "_no_split_modules", None) or [])
        source = f"{type(model).__name__}._no_split_modules"
    if not names:
        names = _repeated_block_classes(model)
        source = f"the repeated blocks of {type(model).__name__}"
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"{source} names {missing}, which are not module classes of {type(model).__name__}; set "
            f"fsdp_layer_classes to its transformer block class (e.g. one of {sorted(by_name)[:8]})"
        )
    if not names:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules and has no list of repeated blocks; "
            "set fsdp_layer_classes (e.g. ['LlamaDecoderLayer']) to its transformer block class"
        )
    return tuple(by_name[n] for n in names)


def _repeated_block_classes(model: torch.nn.Module) -> list[str]:
    """The class of the largest ModuleList of identical modules (a transformer's
    layer stack), for models that declare no _no_split_modules (e.g. BERT
    classifiers)."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            classes = {type(child) for child in module}
            size = sum(p.numel() for p in module.parameters())
            if len(classes) == 1 and size > best_size:
                best, best_size = next(iter(classes)).__name__, size
    return [best] if best else []
