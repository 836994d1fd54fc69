"""Built-in tasks: real offline models and datasets wired to the config tree."""
from __future__ import annotations

import torch

from .base import Task, model_config, resolve_model_path
from .causal_lm import CAUSAL_DATASETS, build_causal_task
from .text_classification import DATASETS, build_classification_task


def build_task(cfg) -> Task:
    """Model, tokenizer and tokenized datasets for a RunConfig."""
    dataset = cfg.data.dataset
    if dataset in CAUSAL_DATASETS:
        return build_causal_task(cfg)
    if dataset in DATASETS:
        return build_classification_task(cfg)
    raise ValueError(f"data.dataset={dataset!r} is unknown; choose one of {sorted(DATASETS) + sorted(CAUSAL_DATASETS)}")


def build_model_on_meta(cfg) -> torch.nn.Module:
    """The configured architecture without weights or memory (for estimates)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(cfg, resolve_model_path(cfg.model.name_or_path))
    cls = AutoModelForCausalLM if cfg.data.dataset in CAUSAL_DATASETS else AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls.from_config(config)


__all__ = ["Task", "build_model_on_meta", "build_task", "resolve_model_path"]
