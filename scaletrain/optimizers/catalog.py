"""Which of HF's `optim` names scaletrain builds, and why the others are refused.

The optimizer class and its arguments come from HF's own mapping
(transformers.Trainer.get_optimizer_cls_and_kwargs), so a name means exactly
what it means under the HF Trainer.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from transformers.training_args import OptimizerNames

from ..errors import NotSupportedError

TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
    "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "ademamix",
    "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
)
SCHEDULE_FREE_OPTIMIZERS = ("schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd")
LOW_RANK_OPTIMIZERS = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw")
OTHER_OPTIMIZERS = ("grokadamw", "stable_adamw", "adamw_torch_4bit", "adamw_torch_8bit")
SUPPORTED = TORCH_OPTIMIZERS + BITSANDBYTES_OPTIMIZERS + SCHEDULE_FREE_OPTIMIZERS + LOW_RANK_OPTIMIZERS + \
    OTHER_OPTIMIZERS

# the package (import name, pip name) each optimizer needs; `pip install 'scaletrain[optimizers]'` has them all
_PACKAGES = {
    **dict.fromkeys(BITSANDBYTES_OPTIMIZERS, ("bitsandbytes", "bitsandbytes")),
    **dict.fromkeys(SCHEDULE_FREE_OPTIMIZERS, ("schedulefree", "schedulefree")),
    **dict.fromkeys(("galore_adamw", "galore_adamw_8bit", "galore_adafactor"), ("galore_torch", "galore-torch")),
    "apollo_adamw": ("apollo_torch", "apollo-torch"), "grokadamw": ("grokadamw", "grokadamw"),
    "stable_adamw": ("optimi", "torch-optimi"),
    **dict.fromkeys(("adamw_torch_4bit", "adamw_torch_8bit"), ("torchao", "torchao")),
}

# the optim_args keys HF reads for each optimizer (transformers/trainer_optimizer.py); HF ignores any other
# key without a word, scaletrain refuses it
_OPTIM_ARGS = {
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "weight_decay", "centered"),
    **dict.fromkeys(("ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit"),
                    ("beta1", "beta2", "beta3", "alpha", "eps", "t_alpha", "t_beta3")),
    **dict.fromkeys(("galore_adamw", "galore_adamw_8bit", "galore_adafactor"),
                    ("rank", "update_proj_gap", "scale", "proj_type")),
    "apollo_adamw": ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type"),
    "grokadamw": ("alpha_init", "lamb", "gamma", "grokking_signal_decay_rate", "gradient_clipping"),
    **dict.fromkeys(SCHEDULE_FREE_OPTIMIZERS, ("weight_lr_power", "r")),
    "stable_adamw": ("max_lr", "kahan_sum", "decouple_lr"),
    **dict.fromkeys(("adamw_torch_4bit", "adamw_torch_8bit"), ("block_size", "bf16_stochastic_round")),
}

_LAYERWISE = "steps each parameter inside backward, which exact gradient accumulation and no_sync cannot follow"
_WHY_NOT = {
    "adamw_torch_xla": "it needs torch_xla (TPU)",
    "adamw_torch_npu_fused": "it needs an Ascend NPU build of torch",
    "adamw_anyprecision": "it needs torchdistx, which has no release for this torch",
    "lomo": "LOMO fuses the update into backward, which exact gradient accumulation and no_sync cannot follow",
    "adalomo": "LOMO fuses the update into backward, which exact gradient accumulation and no_sync cannot follow",
    **{f"{name}_layerwise": f"the layer-wise variant {_LAYERWISE}; use {name}"
       for name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw")},
}


def check_optimizer_name(name) -> None:
    """Raise before launch for a name HF does not know, or one scaletrain does not build."""
    value = getattr(name, "value", name)
    known = {o.value for o in OptimizerNames}
    if value not in known:
        raise ValueError(f"optim={value!r} is not one of HF's optimizer names; supported: {', '.join(SUPPORTED)}")
    if value not in SUPPORTED:
        why = _WHY_NOT.get(value, "it is not implemented yet")
        raise NotSupportedError(f"optim={value!r} is not supported by scaletrain: {why}. Supported: "
                                f"{', '.join(SUPPORTED)}; or pass optimizers=/optimizer_cls_and_kwargs= to the Trainer")
    if value in _PACKAGES and importlib.util.find_spec(_PACKAGES[value][0]) is None:
        raise NotSupportedError(f"optim={value!r} needs the {_PACKAGES[value][1]} package: pip install "
                                f"{_PACKAGES[value][1]} (or 'scaletrain[optimizers]')")


def check_target_modules(name, optim_target_modules) -> None:
    """GaLore/APOLLO project the gradients of optim_target_modules; no other optimizer reads it."""
    value = getattr(name, "value", name)
    if value in LOW_RANK_OPTIMIZERS and not optim_target_modules:
        raise ValueError(f"optim={value!r} projects the gradients of optim_target_modules, which is not set; "
                         "e.g. optim_target_modules=['attn', 'mlp'] (module names or a regex) or 'all-linear'")
    if value not in LOW_RANK_OPTIMIZERS and optim_target_modules:
        raise NotSupportedError(f"optim_target_modules={optim_target_modules!r} is read only by GaLore/APOLLO "
                                f"optimizers ({', '.join(LOW_RANK_OPTIMIZERS)}), not by optim={value!r}")
    if optim_target_modules is not None and not isinstance(optim_target_modules, (str, list)):
        raise ValueError(f"optim_target_modules={optim_target_modules!r} must be a list of module names, a regex "
                         "string, or 'all-linear'")


def check_optim_args(name, optim_args: Optional[str]) -> None:
    """optim_args as HF parses it ("key=value,key=value"), with only the keys HF reads for this optimizer."""
    if not optim_args:
        return
    value = getattr(name, "value", name)
    pairs = [item for item in optim_args.replace(" ", "").split(",") if item]
    malformed = [item for item in pairs if item.count("=") != 1]
    if malformed:
        raise ValueError(f"optim_args={optim_args!r}: {malformed[0]!r} is not key=value; write e.g. "
                         "'momentum=0.9,nesterov=true'")
    keys = [item.split("=")[0] for item in pairs]
    allowed = _OPTIM_ARGS.get(value, ())
    unknown = [k for k in keys if k not in allowed]
    if not allowed:
        raise NotSupportedError(f"optim_args={optim_args!r}: optim={value!r} reads no optim_args (HF ignores them); "
                                "use adam_beta1/adam_beta2/adam_epsilon/weight_decay, or optimizer_cls_and_kwargs")
    if unknown:
        raise ValueError(f"optim_args key {unknown[0]!r} is not read by optim={value!r} (HF would ignore it); its "
                         f"keys are {', '.join(allowed)}")


# measured on 2 gloo ranks: FSDP2's DTensor parameters break HF's Adafactor and APOLLO (mixed Tensor/DTensor
# state) and bitsandbytes' kernels (no sharding rule); DeepSpeed ZeRO cannot partition Adagrad's state made at
# construction, flattens the 2-D weights GaLore/APOLLO project (IndexError), and keeps its own fp32 copy of the
# weights, which a schedule-free optimizer's train/eval switch never reaches (evaluation saw the training point)
_ZERO_CANNOT = {"adagrad", *SCHEDULE_FREE_OPTIMIZERS, *LOW_RANK_OPTIMIZERS}
_STRATEGIES_THAT_CANNOT = {"fsdp": set(BITSANDBYTES_OPTIMIZERS) | {"adafactor", "galore_adafactor", "galore_adamw_8bit",
                                                                   "apollo_adamw"},
                           "zero1": _ZERO_CANNOT, "zero2": _ZERO_CANNOT, "zero3": _ZERO_CANNOT}
# galore_torch's 8-bit AdamW calls CUDA kernels only
CUDA_ONLY = ("galore_adamw_8bit",)


def check_optimizer_for_strategy(name, strategy: str, on_cuda: bool) -> None:
    value = getattr(name, "value", name)
    if value in CUDA_ONLY and not on_cuda:
        raise NotSupportedError(f"optim={value!r} runs CUDA kernels only; on this device use galore_adamw")
    if value in _STRATEGIES_THAT_CANNOT.get(strategy, ()):
        working = [s for s in ("ddp", "fsdp", "zero1", "zero2", "zero3")
                   if value not in _STRATEGIES_THAT_CANNOT.get(s, ())]
        raise NotSupportedError(f"optim={value!r} does not work with strategy {strategy!r}; use it with "
                                f"{' or '.join(working)}, or choose another optimizer for {strategy}")
