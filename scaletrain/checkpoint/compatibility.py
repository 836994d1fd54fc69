"""Does a checkpoint belong to this model?

A resume must refuse another architecture and accept the same model whatever
transformers wrote into its config while it trained. HF mutates configs at run
time: sequence-classification models set `problem_type` on their first forward
with labels, the Trainer sets `use_cache`, loading picks an attention
implementation and records dtypes, `save_pretrained` adds `architectures`. A
hash of the whole config therefore differs between save and resume of the very
same model. What defines the weights is compared instead: the model class, every
parameter's name and (unsharded) shape, and the config fields that shape the
computation without showing in a parameter shape (attention heads, activation,
norm epsilon, rotary settings, ...).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..parallel.pipeline_runtime import pipeline_of
from .manager import CheckpointError

logger = logging.getLogger(__name__)

# Config fields that define the architecture. Fields sized by a parameter
# (vocab_size, hidden_size, layers, ...) are listed too: the shapes catch a
# change already, the field names it in plain words.
ARCHITECTURE_FIELDS = frozenset({
    "model_type",
    "vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
    "num_decoder_layers", "encoder_layers", "decoder_layers", "intermediate_size", "n_inner", "d_ff",
    "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "n_positions", "type_vocab_size",
    "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "encoder_attention_heads",
    "decoder_attention_heads", "head_dim", "d_kv", "hidden_act", "activation_function", "feed_forward_proj",
    "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "position_embedding_type", "relative_attention_num_buckets", "relative_attention_max_distance",
    "tie_word_embeddings", "is_encoder_decoder", "sliding_window", "scale_attn_weights", "attention_bias",
    "mlp_bias", "num_experts", "num_local_experts", "num_experts_per_tok",
})


def _architecture(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The architecture fields of a config dict, flat; nested model configs (an
    encoder-decoder's encoder/decoder, a multimodal text_config) under dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            out.update(_architecture(value, f"{prefix}{key}."))
        elif key in ARCHITECTURE_FIELDS:
            out[f"{prefix}{key}"] = value
    return out


def _unsharded_shape(parameter: torch.Tensor) -> list[int]:
    # ZeRO-3 leaves an empty local partition and records the full shape apart;
    # FSDP2's DTensor reports its global shape itself
    return list(getattr(parameter, "ds_shape", parameter.shape))


def model_fingerprint(model: torch.nn.Module, class_name: str) -> dict[str, Any]:
    """What a checkpoint records about the model it holds (JSON data)."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    return {
        "model_class": class_name,
        "parameters": _whole_model_shapes(model),
        "architecture": _architecture(config_dict),
    }


def _whole_model_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's unsharded shape, of the whole model even where this rank holds one pipeline part."""
    pipeline = pipeline_of(model)
    if pipeline is not None:
        return {name: list(shape) for name, shape in pipeline.full_shapes.items()}
    return {name: _unsharded_shape(p) for name, p in model.named_parameters()}


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each way the checkpoint's model differs from this one, in words; empty when they are the same."""
    problems = []
    if saved["model_class"] != current["model_class"]:
        problems.append(f"model class {saved['model_class']} there, {current['model_class']} here")
    saved_arch, current_arch = saved["architecture"], current["architecture"]
    for key in sorted(set(saved_arch) | set(current_arch)):
        if saved_arch.get(key) != current_arch.get(key):
            problems.append(f"config {key}={saved_arch.get(key)!r} there, {current_arch.get(key)!r} here")
    saved_params, current_params = saved["parameters"], current["parameters"]
    only_saved = [n for n in saved_params if n not in current_params]
    only_current = [n for n in current_params if n not in saved_params]
    if only_saved:
        problems.append(f"{len(only_saved)} parameters only in the checkpoint: {_listed(only_saved)}")
    if only_current:
        problems.append(f"{len(only_current)} parameters only in this model: {_listed(only_current)}")
    reshaped = [f"{n} {saved_params[n]} there, {current_params[n]} here" for n in saved_params
                if n in current_params and list(saved_params[n]) != list(current_params[n])]
    if reshaped:
        problems.append(f"{len(reshaped)} parameters of another shape: {_listed(reshaped)}")
    return problems


def check_same_model(path: Path, manifest: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise CheckpointError when the checkpoint at `path` holds another model."""
    saved = manifest.get("model_fingerprint")
    if saved is None:
        # older checkpoints recorded a hash of the whole config, which HF's lazy
        # config writes make unusable; the state load still refuses other shapes
        logger.warning("%s records no model fingerprint (an older checkpoint); only the state load checks shapes",
                       path)
        return
    problems = fingerprint_differences(saved, current)
    if problems:
        raise CheckpointError(
            f"{path} was saved for a different model configuration: {'; '.join(problems)}. Resume with the model "
            "it was trained with, or start a new run from its weights (scaletrain export, then from_pretrained)"
        )
