"""LoRA as a model transform (peft), composed with every strategy.

The adapters are added before the strategy wraps the model, so DDP, FSDP2 and
DeepSpeed see an ordinary module whose base weights have requires_grad=False:
the optimizer gets only the adapters (and modules_to_save), DDP reduces only
their gradients, FSDP2 shards frozen and trainable parameters of a block
together, and checkpoints keep only what trains (Strategy.state_dict skips
frozen parameters; the base weights come from the model source again).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .base import Middleware

logger = logging.getLogger(__name__)

_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": None,
             "bias": "none"}


def lora_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Validated LoRA settings with defaults filled in (raises on unknown keys)."""
    unknown = set(raw) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"lora has unknown keys {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    settings = {**_DEFAULTS, **raw}
    if not isinstance(settings["r"], int) or settings["r"] < 1:
        raise ValueError(f"lora r={settings['r']!r} must be an integer >= 1")
    if not 0.0 <= float(settings["dropout"]) < 1.0:
        raise ValueError(f"lora dropout={settings['dropout']!r} must be in [0, 1)")
    if settings["bias"] not in ("none", "all", "lora_only"):
        raise ValueError(f"lora bias={settings['bias']!r} must be 'none', 'all' or 'lora_only'")
    target = settings["target_modules"]
    names_listed = isinstance(target, list) and target and all(isinstance(t, str) for t in target)
    if not (target == "all-linear" or names_listed):
        raise ValueError(f"lora target_modules={target!r} must be 'all-linear' or a list of module names")
    return settings


def _task_type(model: torch.nn.Module) -> str | None:
    """peft's task type from the transformers class (it decides, e.g., that a
    classifier head trains in full)."""
    names = [cls.__name__ for cls in type(model).__mro__]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS")):
        if any(n.endswith(suffix) for n in names):
            return task
    return None


class LoRA(Middleware):
    name = "lora"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.trainable = 0
        self.total = 0

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        from .quantization import disable_cpu_repacking

        if isinstance(model, PeftModel):  # already adapted (by the user, or an earlier train())
            disable_cpu_repacking(model)
            self.trainable, self.total = model.get_nb_trainable_parameters()
            return model
        s = self.settings
        config = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=float(s["dropout"]),
                            target_modules=s["target_modules"], modules_to_save=s["modules_to_save"], bias=s["bias"],
                            task_type=_task_type(model))
        adapted = get_peft_model(model, config)
        disable_cpu_repacking(adapted)  # a base quantized by from_pretrained(BitsAndBytesConfig) too
        self.trainable, self.total = adapted.get_nb_trainable_parameters()
        logger.info("LoRA r=%d alpha=%s on %s: %d of %d parameters train (%.2f%%)", s["r"], s["alpha"],
                    s["target_modules"], self.trainable, self.total, 100 * self.trainable / max(self.total, 1))
        return adapted

    def describe(self) -> str:
        return f"LoRA (r={self.settings['r']}, {self.trainable:,} trainable)"
