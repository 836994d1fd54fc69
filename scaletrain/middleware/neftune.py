"""NEFTune: uniform noise on the input embeddings in training forwards (HF's neftune_noise_alpha).

A model transform, so it composes with every strategy: the hook (transformers'
own) goes on the input embedding before the strategy wraps the model, and acts
only while the module is in training mode, and is removed when train() ends, as
the HF Trainer removes it.
"""
from __future__ import annotations

import torch
from transformers.integrations.neftune import neftune_post_forward_hook

from .base import Middleware


def check_options(args) -> None:
    alpha = args.neftune_noise_alpha
    if alpha is not None and not alpha > 0:
        raise ValueError(f"neftune_noise_alpha={alpha} must be > 0, or None for no noise")


class NEFTune(Middleware):
    name = "neftune"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._hook = None

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if not isinstance(embeddings, torch.nn.Embedding):
            raise ValueError(f"neftune_noise_alpha needs a model with an nn.Embedding input embedding; "
                             f"{type(model).__name__} has {type(embeddings).__name__}")
        embeddings.neftune_noise_alpha = self.alpha
        if self._hook is None:  # a second train() on the same model keeps one hook
            self._hook = embeddings.register_forward_hook(neftune_post_forward_hook)
        return model

    def after_training(self, model: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def describe(self) -> str:
        return f"neftune (alpha {self.alpha})"
