"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and
optimizer state sharded over ranks, one all-gather per transformer block.

FSDP1 (FullyShardedDataParallel) is not offered: on CPU/gloo it aborts at exit
and its CPU offload fails, and FSDP2's DTensor state works with DCP directly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..errors import NotSupportedError
from ..modeling import block_classes
from ..parallel.pipeline_runtime import pipeline_of, pipeline_roots
from .base import OptimizerFactory, Strategy
from .precision import check_full_eval


def _packed_quantized(param: torch.nn.Parameter) -> bool:
    """A QLoRA base weight (bitsandbytes Params4bit / Int8Params): integer-packed
    values whose scales live outside the tensor, so a DTensor shard of it could
    not be dequantized. FSDP2 leaves these whole on every rank (they are frozen,
    so no gradient is reduced); the adapters, norms and embeddings are sharded."""
    return getattr(param, "quant_state", None) is not None or not param.is_floating_point()


_OWN_FLAGS = ("fsdp_layer_classes", "fsdp_cpu_offload", "fsdp_low_memory_init", "fsdp_prefetch")


def check_options(args) -> None:
    """FSDP's options mean nothing to another strategy: refused there rather than ignored."""
    if args.strategy == "fsdp":
        check_full_eval(args, "FSDP2's sharded DTensor parameters")
        if args.fsdp_low_memory_init and args.parallelism_config is not None and args.parallelism_config.tp_size > 1:
            raise NotSupportedError("fsdp_low_memory_init=True with parallelism_config tp_size > 1: tensor "
                                    "parallelism splits the weights every rank holds; drop fsdp_low_memory_init")
        if args.fsdp_prefetch is not None and (not isinstance(args.fsdp_prefetch, int) or args.fsdp_prefetch < 1):
            raise ValueError(f"fsdp_prefetch={args.fsdp_prefetch!r} must be an integer >= 1 (blocks gathered ahead), "
                             "or None for FSDP2's implicit prefetching")
        return
    for name in _OWN_FLAGS:
        if getattr(args, name):
            raise ValueError(f"{name}={getattr(args, name)!r} only applies to strategy: fsdp "
                             f"(strategy is {args.strategy!r})")
    if not args.fsdp_reshard_after_forward:
        raise ValueError("fsdp_reshard_after_forward=False only applies to strategy: fsdp")


def _shares_parameters_outside(model: torch.nn.Module, prefix: str, module: torch.nn.Module) -> bool:
    """A unit holding a parameter tied to one outside it (a BERT decoder's word embeddings and its LM
    head, when _no_split_modules names the embeddings) cannot be an FSDP group of its own: it stays with
    the root group, which holds both ends of the tie."""
    inside = {id(p) for p in module.parameters()}
    return any(id(p) in inside and not (name == prefix or name.startswith(prefix + "."))
               for name, p in model.named_parameters(remove_duplicate=False))


def _set_prefetch(units: list[torch.nn.Module], depth: Optional[int]) -> None:
    """fsdp_prefetch=N: each block's forward issues the all-gathers of the next N blocks, and its backward
    those of the N before it (torchtitan's explicit prefetching; FSDP2 alone overlaps one block, implicitly)."""
    if not depth:
        return
    for i, unit in enumerate(units):
        after, before = units[i + 1:i + 1 + depth], units[max(0, i - depth):i][::-1]
        if after:
            unit.set_modules_to_forward_prefetch(after)
        if before:
            unit.set_modules_to_backward_prefetch(before)


class FSDPStrategy(Strategy):
    name = "fsdp"
    needs_process_group = True
    eval_needs_all_ranks = True
    compiles_per_block = True
    shards_with_fsdp2 = True

    def __init__(self, args, env=None) -> None:
        super().__init__(args, env)
        # set by enable_mixed_precision: torch.distributed.fsdp.MixedPrecisionPolicy
        self.mixed_precision_policy = None

    # ---------------------------------------------------------------- model
    def build_model(self, from_pretrained: Callable[[], torch.nn.Module],
                    from_config: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if self.args.fsdp_low_memory_init and not self.is_main:
            # no storage at all: setup() shards the model, then fills each
            # rank's shard from rank 0's weights
            with torch.device("meta"):
                return from_config()
        return from_pretrained()

    def layer_classes(self, model: torch.nn.Module) -> tuple[type, ...]:
        """The module classes that become one FSDP unit each."""
        return block_classes(model, self.args.fsdp_layer_classes)

    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

        model = self.cut_pipeline_stages(model)  # before the move: no rank holds the whole model on its device
        on_meta = any(p.is_meta for p in model.parameters())
        any_meta = bool(self.all_reduce_max(torch.tensor([int(on_meta)], device=self.device)).item())
        if on_meta and self.is_main:
            raise ValueError("rank 0 built the model on the meta device; it must hold the real weights "
                             "(build the model with Strategy.build_model)")
        source_state = model.state_dict() if any_meta and self.is_main else None
        if not on_meta:
            model.to(self.device)
        model = self.split_layers(model)  # tensor parallelism first: FSDP shards the tp shards (2-D)

        mesh = self.layout.fsdp_mesh(self.device.type)  # (dp_replicate, dp_shard x sp): HSDP
        kwargs = {"mesh": mesh, "reshard_after_forward": self.args.fsdp_reshard_after_forward}
        if self.args.fsdp_cpu_offload:
            # pinned memory needs an accelerator; on a CPU-only host it fails
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        if self.mixed_precision_policy is not None:
            kwargs["mp_policy"] = self.mixed_precision_policy
        blocks = self.layer_classes(model)
        whole = {p for p in model.parameters() if _packed_quantized(p)}
        units = [module for name, module in model.named_modules()
                 if isinstance(module, blocks) and not _shares_parameters_outside(model, name, module)]
        for module in units:
            fully_shard(module, **kwargs, ignored_params={p for p in module.parameters() if p in whole})
        for root in pipeline_roots(model):  # this rank's pipeline stages, or the whole model
            fully_shard(root, **kwargs, ignored_params={p for p in root.parameters() if p in whole})
        # (the roots hold the rest: embeddings, head, final norm)
        _set_prefetch(units, self.args.fsdp_prefetch)
        if callable(getattr(model, "generate", None)) and pipeline_of(model) is None:
            # generate() calls submodules (e.g. the encoder) directly, not
            # model.forward: the root's parameters must be gathered around it
            register_fsdp_forward_method(model, "generate")

        if any_meta:
            self._materialise_from_rank0(model, on_meta, source_state)
        return model, optimizer_factory(model)

    def _materialise_from_rank0(self, model: torch.nn.Module, on_meta: bool, source_state) -> None:
        if on_meta:
            model.to_empty(device="cpu" if self.args.fsdp_cpu_offload else self.device)
        set_model_state_dict(model, source_state if self.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # non-persistent buffers (e.g. rotary inv_freq) are in no state dict
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def enable_mixed_precision(self, dtype: torch.dtype) -> bool:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # shards and optimizer stay fp32; gathered parameters (hence compute)
        # are `dtype`; gradients are reduced in fp32 so the sum over ranks does
        # not round at low precision
        self.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        return True

    # make_grad_scaler: the base GradScaler suffices. Its unscale_ runs on the
    # DTensor gradient shards, and DTensor reduces found_inf (max) over the mesh,
    # so an inf in any rank's shard skips the step on every rank (tested with an
    # inf in one rank's shard only).

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # forwards need the sharded module's all-gathers

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
