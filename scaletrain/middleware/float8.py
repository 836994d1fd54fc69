"""float8 training (TrainingArguments.float8): torchao's `convert_to_float8_training` swaps the model's
Linear layers for Float8Linear, whose forward and backward matmuls cast inputs, weights and gradients to
float8 with dynamic tensor-wise scales (torchao's "tensorwise" recipe); the weights stay in their training
dtype and the optimizer sees them as before. Under FSDP2 the weights are also all-gathered in float8
(`enable_fsdp_float8_all_gather`), halving the gathers' bytes against bf16.

Which layers: nn.Linear whose in and out features are multiples of 16 (float8 matmul kernels need it), not
the LM head (its logits feed the loss; torchtitan keeps it in high precision too). The speed-up is a GPU's
(H100-class float8 tensor cores); on CPU, torch's `_scaled_mm` runs the same numerics slowly, which is what the
tests check. Refused, naming the alternative: LoRA/QLoRA (the adapters' base layers are frozen or quantized),
tensor parallelism (its plan would need torchao's float8 parallel styles), DeepSpeed (its engine owns the
layers' precision) and fp16 (float8 training pairs with bf16 or fp32 master weights).
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import NotSupportedError
from ..modeling import library_model
from .base import Middleware

_DIVISOR = 16  # float8 matmuls need both matrix dimensions to be multiples of 16


def check_options(args) -> None:
    if not args.float8:
        return
    if importlib.util.find_spec("torchao") is None:
        raise NotSupportedError("float8=True needs torchao: pip install 'scaletrain[float8]' (torchao)")
    for name, set_, why in (
        ("lora", args.lora is not None, "the adapted layers' base weights are frozen (or quantized)"),
        ("fp16", bool(args.fp16), "float8 training keeps bf16 or fp32 master weights: use bf16"),
        ("tp_size", args.parallelism_config is not None and args.parallelism_config.tp_size > 1,
         "tensor-parallel layers would need torchao's float8 parallel styles"),
        (f"strategy {args.strategy!r}", args.strategy.startswith("zero"), "DeepSpeed's engine owns the layers' "
                                                                          "precision: use fsdp"),
    ):
        if set_:
            raise NotSupportedError(f"float8=True with {name}: {why}")


def converts(module: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether float8 training converts `module` (a Linear of float8-friendly size, not the LM head)."""
    return (isinstance(module, torch.nn.Linear) and module is not head
            and module.in_features % _DIVISOR == 0 and module.out_features % _DIVISOR == 0)


class Float8Training(Middleware):
    name = "float8"

    def __init__(self) -> None:
        self.converted = 0

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        base = library_model(model)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=strategy.shards_with_fsdp2)
        self.converted = sum(converts(m, head) for m in base.modules())
        if not self.converted:
            raise ValueError(f"float8=True: {type(base).__name__} has no Linear layer whose sizes are multiples of "
                             f"{_DIVISOR} (besides the LM head); train it without float8")
        convert_to_float8_training(base, config=config, module_filter_fn=lambda m, _fqn: converts(m, head))
        return model

    def describe(self) -> str:
        return f"float8 matmuls in {self.converted} Linear layers (torchao)"
