"""Tensor parallelism from the model's own Hugging Face plan (config.base_model_tp_plan), applied with torch's
parallelize_module on the layout's tp mesh before the data-parallel wrapper (DDP or FSDP2) goes on.

The plan's column-wise layers (q/k/v, gate/up) split their output features over the tp ranks, its row-wise
ones (o, down) their input features, so a decoder layer needs one all-reduce in attention and one in the MLP;
HF's attention reshapes with -1 heads, so each rank simply runs its share of the heads. Embeddings, norms and
the LM head stay whole on every tp rank (a tied head must stay the embedding's tensor), so their gradients are
the same on every tp rank without communication. LoRA layers (peft) split with their base layer. Checked
before any of it: the plan exists, every style is one this module maps, and tp divides the attention heads,
the key/value heads and the MLP width.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..modeling import library_model

# HF's style names (transformers.integrations.tensor_parallel) -> torch's styles
_STYLES = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
}
_DIVIDED = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def tensor_parallel_plan(model: torch.nn.Module, tp: int) -> dict[str, Any]:
    """Module name (relative to the transformers model, inside a peft wrapper if there is one) -> torch
    ParallelStyle for every module the model's plan names; raises naming the model, the style or the size
    that stands in the way, and the fix."""
    model = library_model(model)
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"parallelism_config tp_size={tp}: {type(model).__name__} has no tensor-parallel plan "
                         "(its config's base_model_tp_plan is empty); use tp_size=1 with dp_shard_size, or a "
                         "model family transformers ships a plan for (Llama, Qwen2, Mistral, Gemma, ...)")
    for field in _DIVIDED:
        value = getattr(config, field, None)
        if isinstance(value, int) and value % tp:
            raise ValueError(f"parallelism_config tp_size={tp} does not divide the model's {field}={value}; "
                             f"use a tp_size that divides it")
    unknown = sorted({style for style in plan.values() if style not in _STYLES})
    if unknown:
        raise ValueError(f"parallelism_config tp_size={tp}: the model's plan uses {unknown}, which scaletrain does "
                         f"not map to torch styles (it maps {sorted(_STYLES)}); use tp_size=1")
    prefix = getattr(model, "base_model_prefix", "")
    styles = {}
    for name, module in model.named_modules():
        relative = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name
        for pattern, style in plan.items():
            if fnmatch.fnmatchcase(relative, pattern):
                styles.update(_styles_for(name, module, style, tp))
    if not styles:
        raise ValueError(f"parallelism_config tp_size={tp}: no module of {type(model).__name__} matches its "
                         f"tensor-parallel plan {sorted(plan)}")
    return styles


def _styles_for(name: str, module: torch.nn.Module, style: str, tp: int) -> dict[str, Any]:
    """A plain layer splits as planned. A LoRA layer (peft) splits its frozen base layer as planned and, of
    the adapter, the factor on the split side the same way: lora_B's output features for a column-wise layer,
    lora_A's input features for a row-wise one; the rank-r factor between stays whole on every tp rank (its
    gradient arrives reduced over the tp ranks, as a replicated input's does)."""
    if not hasattr(module, "base_layer") or not hasattr(module, "lora_A"):
        return {name: _STYLES[style]()}
    if any(getattr(module, "use_dora", {}).values()):
        raise ValueError(f"parallelism_config tp_size={tp} with DoRA ({name}): its magnitude vector normalises "
                         "whole weight rows, which tensor parallelism splits; use plain LoRA or tp_size=1")
    if type(module.base_layer) is not torch.nn.Linear:
        raise ValueError(f"parallelism_config tp_size={tp}: the LoRA layer {name} wraps a "
                         f"{type(module.base_layer).__name__} (QLoRA's quantized weights cannot be split as "
                         "DTensors); use LoRA on unquantized weights, or tp_size=1")
    factor = "lora_B" if style.startswith("colwise") else "lora_A"
    styles = {f"{name}.base_layer": _STYLES[style]()}
    styles.update({f"{name}.{factor}.{adapter}": _STYLES[style]() for adapter in getattr(module, factor)})
    return styles


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """The plan's layers split over `tp_mesh` in place; their parameters become DTensors."""
    parallelize_module(library_model(model), tp_mesh, tensor_parallel_plan(model, tp_mesh.size()))
    return model


def check_model_splits(build_from_config, tp: int) -> None:
    """Before any process group: the model, built from its config on the meta device (no memory, no
    weights), has a plan that `tp` ranks can serve; raises as tensor_parallel_plan does."""
    with torch.device("meta"):
        model = build_from_config()
    tensor_parallel_plan(model, tp)
