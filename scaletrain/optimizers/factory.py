"""Default optimizer and LR schedule, built the way the HF Trainer builds them."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from transformers import get_scheduler
from transformers.trainer import Trainer as HFTrainer
from transformers.optimization import GreedyLR
from transformers.trainer_pt_utils import get_parameter_names

from .catalog import check_optimizer_name

# transformers.Trainer.get_decay_parameter_names' patterns, searched in lower-cased parameter names
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weight decay applies to weights, not to biases or normalisation layers: HF's rule (norm layers by
    type, and by name, which catches model-specific norms such as LlamaRMSNorm)."""
    return get_parameter_names(model, list(NORM_LAYERS), NO_DECAY_NAME_PATTERNS)


def parameter_groups(model: torch.nn.Module, decay_names: list[str], weight_decay: float) -> list[dict]:
    decay = set(decay_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def optimizer_cls_and_kwargs_for(args, model: Optional[torch.nn.Module] = None) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its arguments for `args.optim`: HF's own mapping, for the names
    scaletrain builds (scaletrain/optimizers/catalog.py)."""
    check_optimizer_name(args.optim)
    return HFTrainer.get_optimizer_cls_and_kwargs(args, model)


def build_optimizer(model: torch.nn.Module, groups: list[dict], args,
                    optimizer_cls_and_kwargs: Optional[tuple] = None) -> torch.optim.Optimizer:
    """As HF's create_optimizer: GaLore/APOLLO bring their own parameter groups (the projected modules'
    weights in a group of their own), and 8-bit bitsandbytes optimizers keep embeddings in 32 bits."""
    cls, kwargs = optimizer_cls_and_kwargs if optimizer_cls_and_kwargs is not None \
        else optimizer_cls_and_kwargs_for(args, model)
    kwargs = dict(kwargs)
    if "params" in kwargs:
        groups = kwargs.pop("params")
    if _mixes_dtensors(groups) and "foreach" in inspect.signature(cls).parameters:
        # tensor-parallel layers beside whole ones: torch's multi-tensor kernels refuse the mix
        kwargs["foreach"] = False
    optimizer = cls(groups, **kwargs)
    if "bitsandbytes" in str(cls) and kwargs.get("optim_bits") == 8:
        _embeddings_in_32_bits(model)
    return optimizer


def _mixes_dtensors(groups: list[dict]) -> bool:
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for group in groups for p in group["params"]}
    return len(kinds) == 2


def _embeddings_in_32_bits(model: torch.nn.Module) -> None:
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def set_optimizer_mode(optimizer: Optional[torch.optim.Optimizer], training: bool) -> None:
    """Schedule-free optimizers train at one point and evaluate at another (their average): HF switches them
    with optimizer.train()/eval() around training steps and evaluation, and so does scaletrain."""
    switch = getattr(optimizer, "train" if training else "eval", None)
    if callable(switch):
        switch()


def build_scheduler(args, optimizer: torch.optim.Optimizer, num_training_steps: int):
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )


# schedules that step on an evaluation metric, after each evaluation, instead of after each optimizer step
METRIC_SCHEDULES = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


def steps_on_metric(scheduler) -> bool:
    return isinstance(scheduler, METRIC_SCHEDULES)


def current_lr(scheduler, optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group (metric schedules have no get_last_lr before a step)."""
    if steps_on_metric(scheduler):
        return float(optimizer.param_groups[0]["lr"])
    return float(scheduler.get_last_lr()[0])
