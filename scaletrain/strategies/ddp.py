"""DistributedDataParallel: a replicated model whose gradients are averaged over the ranks."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from ..modeling import library_model
from ..performance.memory import local_shard
from .base import OptimizerFactory, Strategy

# config keys of mixture-of-experts models: the router picks other experts from step to step, so a
# parameter used in one step can be unused in the next (DDP must keep searching)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _hf_find_unused_parameters(model: torch.nn.Module, args) -> bool:
    """HF's default when ddp_find_unused_parameters is unset: on for a transformers model unless it
    checkpoints activations, on for any other module. Parameters that get no gradient (a warm-started
    encoder-decoder's encoder pooler) would otherwise stop DDP's reduction at the first step."""
    model = library_model(model)
    if isinstance(model, PreTrainedModel):
        return not (model.is_activation_checkpointing or args.activation_checkpointing)
    return True


def _routes_experts(model: torch.nn.Module) -> bool:
    config = getattr(library_model(model), "config", None)
    return any((getattr(config, key, None) or 0) > 1 for key in _EXPERT_COUNTS)


class UnusedParameterProbe:
    """Whether any trainable parameter gets no gradient, found from the first training step instead of
    assumed. DDP's find_unused_parameters=True costs a traversal of the autograd graph in every
    iteration (and torch warns about it when nothing is unused), while False stops the reduction when a
    parameter is unused. So the first step runs locally (every forward under no_sync), hooks record
    which parameters received a gradient on this rank, and `reduce` averages that step's gradients over
    the ranks as DDP would have (locally unused parameters count as zeros, globally unused ones keep no
    gradient) and says whether any rank left a parameter unused."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.used = torch.zeros(len(self.params))
        self.handles = [p.register_post_accumulate_grad_hook(self._marker(i)) for i, p in enumerate(self.params)]

    def _marker(self, index: int):
        def mark(_param: torch.Tensor) -> None:
            self.used[index] = 1.0
        return mark

    def reduce(self, strategy: Strategy) -> bool:
        for handle in self.handles:
            handle.remove()
        ranks_using = strategy.all_reduce_sum(self.used.to(strategy.device)).tolist()
        world = strategy.world_size
        reduced = [p for p, count in zip(self.params, ranks_using, strict=True) if count > 0]
        for group in _by_dtype(reduced).values():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = _flatten_dense_tensors(grads).div_(world)  # DDP's order: divide, then sum
            strategy.all_reduce_sum(flat)
            for param, grad in zip(group, _unflatten_dense_tensors(flat, grads), strict=True):
                param.grad = grad
        return any(count < world for count in ranks_using)


def _by_dtype(params: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        groups.setdefault(param.dtype, []).append(param)
    return groups


class TensorParallelReplicas:
    """Data parallelism over tensor-parallel replicas. torch's DDP + TP path (_pre_dp_module_transform) swaps
    the DTensor parameters for their local shards, which hides the sharding from gradient clipping (a norm
    over local shards) and from checkpoints; instead the replicas start from their group's first rank's
    weights and average their gradients after each step's backward (DDP's divide-then-sum, one all-reduce
    per dtype over the flattened local shards)."""

    def __init__(self, model: torch.nn.Module, group) -> None:
        self.group, self.size = group, dist.get_world_size(group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        source = dist.get_global_rank(group, 0)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(local_shard(tensor.data), src=source, group=group)

    def average_gradients(self) -> None:
        for group in _by_dtype(self.params).values():
            for param in group:
                if param.grad is None:  # unused this step: a zero gradient on every replica, as DDP's
                    param.grad = torch.zeros_like(param)
            grads = [local_shard(p.grad) for p in group]
            flat = _flatten_dense_tensors(grads).div_(self.size)
            dist.all_reduce(flat, group=self.group)
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(synced)


class DDPStrategy(Strategy):
    """Replicated model, gradients all-reduced (averaged) by DistributedDataParallel."""

    name = "ddp"
    needs_process_group = True
    _static_graph_recorded = False  # with ddp_static_graph: after the first backward

    def __init__(self, args, env=None) -> None:
        super().__init__(args, env)
        self._wrapper: Optional[DistributedDataParallel] = None
        self._ddp_kwargs: dict[str, Any] = {}
        self._probe: Optional[UnusedParameterProbe] = None
        self._search_unused: Optional[bool] = None  # the probe's verdict, until the wrapper follows it
        self._replicas: Optional[TensorParallelReplicas] = None  # with tp: replicas without a DDP wrapper

    @property
    def replicates_optimizer(self) -> bool:
        """Whole on every rank unless tensor-parallel layers split it."""
        return self.layout.tp == 1

    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        model = self.split_layers(model.to(self.device))
        if self.layout.tp > 1:
            self._replicas = TensorParallelReplicas(model, self.layout.batch_mesh(self.device.type).get_group())
            return model, optimizer_factory(model)
        args = self.args
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:
            find_unused = _hf_find_unused_parameters(model, args)
            if find_unused and args.ddp_static_graph is None and not _routes_experts(model):
                self._probe = UnusedParameterProbe(model)  # the first step decides
        kwargs = {"find_unused_parameters": bool(find_unused)}
        if args.ddp_bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = args.ddp_bucket_cap_mb
        if args.ddp_broadcast_buffers is not None:
            kwargs["broadcast_buffers"] = args.ddp_broadcast_buffers
        if args.ddp_static_graph is not None:
            kwargs["static_graph"] = args.ddp_static_graph
        # gradients are views into the all-reduce buckets: one copy of the gradients instead of two
        kwargs["gradient_as_bucket_view"] = args.ddp_gradient_as_bucket_view
        self._ddp_kwargs = kwargs
        self._wrapper = self._wrap(model, kwargs)
        return self._wrapper, optimizer_factory(model)

    def _wrap(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> DistributedDataParallel:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self._probe is None or self._wrapper is None:
            return super().forward_context()
        stack = contextlib.ExitStack()
        stack.enter_context(self._wrapper.no_sync())  # the probing step reduces in finish_backward
        stack.enter_context(super().forward_context())
        return stack

    def finish_backward(self, model: torch.nn.Module) -> None:
        if self._replicas is not None:
            self._replicas.average_gradients()
        if self._probe is not None:
            self._search_unused = self._probe.reduce(self)
            self._probe = None

    def settled_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the probing step: without any unused parameter DDP stops searching for them."""
        search, self._search_unused = self._search_unused, None
        if search is None or search or not isinstance(model, DistributedDataParallel):
            return model
        self._ddp_kwargs["find_unused_parameters"] = False
        # the old reducer's hooks must not fire again, even before the old wrapper is collected
        model._remove_autograd_hooks()
        self._wrapper = self._wrap(model.module, self._ddp_kwargs)
        return self._wrapper

    def no_sync(self, model: torch.nn.Module):
        if not isinstance(model, DistributedDataParallel):
            return super().no_sync(model)
        if model.static_graph and not self._static_graph_recorded:
            # a static graph is recorded by the first backward, which must reduce (torch asserts
            # `expect_autograd_hooks_` otherwise); later micro-steps add local gradients to the
            # reduced ones, and the step's reduction averages them: the same mean gradient
            self._static_graph_recorded = True
            return contextlib.nullcontext()
        return model.no_sync()
