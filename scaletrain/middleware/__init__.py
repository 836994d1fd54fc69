"""Memory features as middleware: objects the trainer calls at fixed points.

Order matters and is explicit (`build_middleware`): model transforms run before
the strategy wraps or shards the model (activation checkpointing must sit
inside FSDP2's units), strategy configuration runs before setup, and
forward contexts wrap every forward. Precision is not middleware: the
strategy owns it (strategies/precision.py), as the backend decides who casts
and who scales the loss.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import activation_ckpt, batch_finder, chunked_loss, compilation, float8, liger, neftune, quantization
from .activation_ckpt import ActivationCheckpointing
from .chunked_loss import ChunkedLoss
from .compilation import TorchCompile
from .float8 import Float8Training
from .base import Middleware
from .liger import LigerKernels
from .lora import LoRA, lora_settings
from .neftune import NEFTune
from ..performance.estimate import precision_of
from .quantization import Quantization, quantization_settings


class MiddlewareStack:
    """The configured middleware, called in order (reverse order for the
    hooks that unwind, like nested context managers)."""

    def __init__(self, items: list[Middleware]) -> None:
        self.items = items

    def configure_strategy(self, strategy) -> None:
        for item in self.items:
            item.configure_strategy(strategy)

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        for item in self.items:
            model = item.transform_model(model, strategy)
        return model

    def after_training(self, model: torch.nn.Module) -> None:
        for item in reversed(self.items):
            item.after_training(model)

    @contextlib.contextmanager
    def forward_context(self):
        with contextlib.ExitStack() as stack:
            for item in self.items:
                stack.enter_context(item.forward_context())
            yield

    def log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in self.items:
            out.update(item.log_values())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {item.name: state for item in self.items if (state := item.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for item in self.items:
            if item.name in state:
                item.load_state_dict(state[item.name])

    def describe(self) -> str:
        """What is on (an 'auto' feature that stayed off says nothing)."""
        return ", ".join(text for item in self.items if (text := item.describe())) or "none"


def check_middleware_options(args) -> None:
    """Each middleware checks (and fills in the defaults of) its own options; run by TrainingArguments."""
    if args.lora is not None:
        args.lora = lora_settings(args.lora)
    if args.quantization is not None:
        args.quantization = quantization_settings(args.quantization)
        quantization.check_composition(args)
    activation_ckpt.check_options(args)
    batch_finder.check_options(args)
    neftune.check_options(args)
    liger.check_options(args)
    chunked_loss.check_options(args)
    float8.check_options(args)
    compilation.check_options(args)


def build_middleware(args, strategy, custom_loss: bool = False) -> MiddlewareStack:
    """`custom_loss`: the Trainer's compute_loss is overridden (the chunked loss then stays off under 'auto')."""
    items: list[Middleware] = []
    if args.use_liger_kernel:  # HF patches the base model before anything wraps it
        items.append(LigerKernels(args.liger_kernel_config))
    if args.quantization is not None:  # QLoRA: the base is quantized before the adapters go on it
        items.append(Quantization(args.quantization, tuple(args.lora.get("modules_to_save") or ())))
    if args.lora is not None:  # before checkpointing, which must see the adapted model
        items.append(LoRA(args.lora))
    if args.neftune_noise_alpha is not None:  # on the (adapted) model's input embedding
        items.append(NEFTune(args.neftune_noise_alpha))
    if args.chunked_loss is not False and not args.use_liger_kernel:  # Liger fuses the head and the loss itself
        items.append(ChunkedLoss(args.chunked_loss, args.chunked_loss_tokens, precision_of(args),
                                 bool(args.activation_checkpointing), custom_loss))
    if args.float8:  # the Linear layers swapped before checkpointing wraps the blocks that hold them
        items.append(Float8Training())
    if args.activation_checkpointing:
        items.append(ActivationCheckpointing(args.activation_checkpointing_kwargs or {}))
    if args.torch_compile:  # last: compiles what the others built
        items.append(TorchCompile(args.torch_compile_backend, args.torch_compile_mode))
    return MiddlewareStack(items)


__all__ = ["Middleware", "MiddlewareStack", "ActivationCheckpointing", "LoRA", "Quantization",
           "build_middleware", "check_middleware_options"]
