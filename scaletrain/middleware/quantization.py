"""QLoRA's base-model quantization (bitsandbytes), a model transform that runs
before LoRA: every nn.Linear of the base except the output head (and modules
that train in full) becomes a frozen bitsandbytes 4-bit (nf4/fp4, optionally
double-quantized) or 8-bit layer, then peft's k-bit preparation casts the
remaining small parameters to fp32 and lets gradients reach the adapters
through the frozen embeddings.

CPU trap (../shared/CPU_NOTES.md): on AVX512-BF16 CPUs a no-grad eval-mode
forward repacks 4-bit weights for a fast kernel that has no autograd, after
which LoRA gradients are silently wrong. `disable_cpu_repacking` switches that
path off on every 4-bit layer, including those of models quantized by
from_pretrained; it costs only eval speed on such CPUs.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from ..errors import NotSupportedError
from .base import Middleware

logger = logging.getLogger(__name__)

_DEFAULTS = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
             "skip_modules": None}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEADS = ("lm_head", "score", "classifier")


def check_composition(args) -> None:
    """QLoRA trains adapters on a quantized base; the base must be real on every rank."""
    if args.lora is None:
        raise ValueError("quantization is set without lora: a quantized base cannot be trained itself; "
                         "add a lora section (QLoRA)")
    if args.fsdp_low_memory_init:
        raise NotSupportedError(
            "quantization (QLoRA) with fsdp_low_memory_init is not supported: the base is quantized on "
            "every rank before sharding, which needs its real weights there, not meta tensors. Set "
            "fsdp_low_memory_init: false (the quantized base is ~1/8 of fp32), or use strategy zero3")


def quantization_settings(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(raw) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"quantization has unknown keys {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    settings = {**_DEFAULTS, **raw}
    if settings["bits"] not in (4, 8):
        raise ValueError(f"quantization bits={settings['bits']!r} must be 4 or 8")
    if settings["quant_type"] not in ("nf4", "fp4"):
        raise ValueError(f"quantization quant_type={settings['quant_type']!r} must be 'nf4' or 'fp4'")
    if settings["compute_dtype"] not in _DTYPES:
        raise ValueError(f"quantization compute_dtype={settings['compute_dtype']!r} must be one of {sorted(_DTYPES)}")
    return settings


def disable_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer on its autograd-capable path (see module docstring)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def quantize_linear_layers(model: torch.nn.Module, settings: dict[str, Any], device: torch.device,
                           keep: tuple[str, ...] = (), whole: Callable[[torch.nn.Module], Any] = None) -> int:
    """Replace the base's nn.Linear layers by frozen bitsandbytes layers, in place.
    `whole(layer)` makes a layer's weights readable in full (a strategy that
    partitioned them at construction gathers them)."""
    whole = whole or (lambda layer: contextlib.nullcontext())
    import bitsandbytes as bnb

    skip = set(_HEADS) | set(keep) | set(settings["skip_modules"] or [])
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head or name in skip:
                continue
            if any(part in skip for part in f"{parent_name}.{name}".split(".")):
                continue
            with whole(child):
                quantized = _quantized(child, settings, device, bnb)
            setattr(parent, name, quantized)
            replaced += 1
    return replaced


def _quantized(linear: torch.nn.Linear, settings: dict[str, Any], device: torch.device, bnb) -> torch.nn.Module:
    weight = linear.weight.detach().to(torch.float32).cpu()
    if settings["bits"] == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=_DTYPES[settings["compute_dtype"]],
                                  compress_statistics=settings["double_quant"], quant_type=settings["quant_type"],
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=settings["double_quant"],
                                         quant_type=settings["quant_type"]).to(device)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device, torch.float32), requires_grad=False)
    return layer


class Quantization(Middleware):
    name = "quantization"

    def __init__(self, settings: dict[str, Any], modules_to_save: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.modules_to_save = modules_to_save
        self.quantized = 0

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        from peft import PeftModel, prepare_model_for_kbit_training

        if isinstance(model, PeftModel):  # quantized and adapted in an earlier train()
            return model
        self.quantized = quantize_linear_layers(model, self.settings, strategy.device, self.modules_to_save,
                                                whole=strategy.whole_parameters)
        if not self.quantized:
            raise ValueError(f"quantization found no nn.Linear layers to quantize in {type(model).__name__}")
        # freezes the base, casts the unquantized rest (norms, embeddings) to
        # fp32, and makes the embedding output require grad so adapters inside
        # checkpointed blocks still receive gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        disable_cpu_repacking(model)
        logger.info("quantized %d linear layers to %d-bit (%s)", self.quantized, self.settings["bits"],
                    self.settings["quant_type"] if self.settings["bits"] == 4 else "int8")
        return model

    def describe(self) -> str:
        bits = self.settings["bits"]
        return f"{bits}-bit base ({self.settings['quant_type'] if bits == 4 else 'int8'}, {self.quantized} layers)"
