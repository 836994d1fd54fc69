"""Facts about a model's structure that several features need (FSDP units,
activation checkpointing, the memory estimator)."""
from __future__ import annotations

import functools
import inspect
import re
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


def library_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft adapter wrapper (itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_class_name(model: torch.nn.Module) -> str:
    """The library class of a model whose class a backend may have wrapped (FSDP2 subclasses it)."""
    for cls in type(library_model(model)).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


@functools.lru_cache(maxsize=1)
def _causal_lm_class_names() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(names)


def label_shift(model: torch.nn.Module) -> int:
    """1 for a decoder-only causal LM, whose loss predicts token t+1 from token t (its
    first label is never a target); 0 otherwise. Looks along the MRO: sharding
    backends may swap the class for a subclass (FSDP2)."""
    model = library_model(model)
    is_causal = any(cls.__name__ in _causal_lm_class_names() for cls in type(model).__mro__)
    return 1 if is_causal and not getattr(getattr(model, "config", None), "is_encoder_decoder", False) else 0


def apply_use_cache(model: torch.nn.Module, use_cache: bool) -> None:
    """As the HF Trainer does: no KV cache in training and evaluation forwards
    unless TrainingArguments.use_cache asks for one (generate keeps its own setting)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = use_cache


def default_ignore_keys(model: torch.nn.Module) -> list[str]:
    """The HF Trainer's default: the config's keys_to_ignore_at_inference, else ["cache"]."""
    config = getattr(library_model(model), "config", None)
    if config is None:
        return []
    return list(getattr(config, "keys_to_ignore_at_inference", ["cache"]) or [])


def tied_copy_names(model: torch.nn.Module) -> set[str]:
    """Every name of a shared parameter after its first (named_parameters order)."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of a tied parameter (e.g. lm_head.weight tied to the
    input embedding). A gathered state dict holds separate tensors for both, so
    save_pretrained cannot see the tie; the saved folder must match an unsharded save."""
    tied = tied_copy_names(model)
    return {name: tensor for name, tensor in state_dict.items() if name not in tied}


def adapter_config(model: torch.nn.Module):
    """An adapted (LoRA) model's peft config, or None."""
    peft_config = getattr(model, "peft_config", None)
    return peft_config["default"] if peft_config else None


def chunked_loss_obstacle(model: torch.nn.Module) -> Optional[str]:
    """None if the model's forward can take the chunked causal-LM loss (middleware/chunked_loss.py), else the
    reason it cannot: its forward must pass lm_head's output straight to self.loss_function."""
    model = library_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        return f"{type(model).__name__} has no plain nn.Linear LM head"
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return f"the source of {type(model).__name__}.forward is not available to check"
    between = re.search(r"logits = self\.lm_head\(.*?\)\n(.*?)self\.loss_function\(\s*(?:logits=)?logits\b", source,
                        re.S)
    if between is None:
        return f"{type(model).__name__}.forward does not pass lm_head's output straight to self.loss_function"
    if re.search(r"\blogits\s*[-+*/]?=|softcap", between.group(1)):
        return f"{type(model).__name__}.forward changes the logits between lm_head and the loss"
    return None
