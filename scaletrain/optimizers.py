"""Which of HF's `optim` names scaletrain builds, and why the others are refused.

The optimizer class and its arguments come from HF's own mapping
(transformers.Trainer.get_optimizer_cls_and_kwargs), so a name means exactly
what it means under the HF Trainer.
"""
from __future__ import annotations

from transformers.training_args import OptimizerNames

from .errors import NotSupportedError

TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
    "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "ademamix",
    "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
)
SUPPORTED = TORCH_OPTIMIZERS + BITSANDBYTES_OPTIMIZERS
_WHY_NOT = {
    "adamw_torch_xla": "it needs torch_xla (TPU)",
    "adamw_torch_npu_fused": "it needs an Ascend NPU build of torch",
    "adamw_anyprecision": "it needs torchdistx, which has no release for this torch",
    "adamw_torch_4bit": "torchao's low-bit optimizers are not wired into the strategies yet",
    "adamw_torch_8bit": "torchao's low-bit optimizers are not wired into the strategies yet",
    "lomo": "LOMO fuses the update into backward, which exact gradient accumulation and no_sync cannot follow",
    "adalomo": "LOMO fuses the update into backward, which exact gradient accumulation and no_sync cannot follow",
    "stable_adamw": "torch-optimi is not among the tested dependencies yet",
    "grokadamw": "grokadamw is not among the tested dependencies yet",
}
for _name in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
              "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw", "apollo_adamw_layerwise"):
    _WHY_NOT[_name] = "GaLore/APOLLO project gradients of optim_target_modules, which is not supported yet"
for _name in ("schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd"):
    _WHY_NOT[_name] = "schedule-free optimizers need train/eval mode switches around evaluation, not wired yet"


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


# measured on 2 gloo ranks: FSDP2's DTensor parameters break HF's Adafactor (mixed Tensor/DTensor state) and
# bitsandbytes' kernels (no sharding rule); DeepSpeed ZeRO cannot partition Adagrad's state made at construction
_STRATEGIES_THAT_CANNOT = {"fsdp": set(BITSANDBYTES_OPTIMIZERS) | {"adafactor"},
                           "zero1": {"adagrad"}, "zero2": {"adagrad"}, "zero3": {"adagrad"}}
_INSTEAD = {"fsdp": "ddp or zero1/zero2/zero3", "zero1": "ddp or fsdp", "zero2": "ddp or fsdp", "zero3": "ddp or fsdp"}


def check_optimizer_for_strategy(name, strategy: str) -> None:
    value = getattr(name, "value", name)
    if value in _STRATEGIES_THAT_CANNOT.get(strategy, ()):
        raise NotSupportedError(f"optim={value!r} does not work with strategy {strategy!r}; use it with "
                                f"{_INSTEAD[strategy]}, or choose another optimizer for {strategy}")
