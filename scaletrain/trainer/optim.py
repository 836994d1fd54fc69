"""Default optimizer and LR schedule, built the way the HF Trainer builds them."""
from __future__ import annotations

from typing import Any, Optional

import torch
import transformers
from transformers import get_scheduler
from transformers.optimization import GreedyLR
from transformers.trainer_pt_utils import get_parameter_names

from ..optimizers import check_optimizer_name

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
    scaletrain builds (scaletrain/optimizers.py)."""
    check_optimizer_name(args.optim)
    return transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)


def build_optimizer(groups: list[dict], args, optimizer_cls_and_kwargs: Optional[tuple] = None
                    ) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_cls_and_kwargs if optimizer_cls_and_kwargs is not None \
        else optimizer_cls_and_kwargs_for(args)
    return cls(groups, **kwargs)


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
