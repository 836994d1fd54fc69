"""The Strategy interface: everything backend-specific the trainer may ask for.

The trainer calls only these methods and never branches on which backend it
has; a new backend is a new subclass.
"""
from __future__ import annotations

import abc
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..checkpoint.hf_trainer_format import HF_TRAINER_FORMAT
from ..checkpoint.state_formats import DCPState, saved_flat_optimizer_state
from ..parallel.environment import DistEnv, process_device, read_env, start_process_group
from ..parallel.layout import ParallelLayout
from ..parallel.pipeline_runtime import Pipeline, attach, pipeline_of
from ..performance.memory import local_shard
from .precision import Precision, apply_tf32

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Strategy(abc.ABC):
    name: str = "base"
    # how save_state writes (checkpoint/state_formats.py): "dcp" (torch.distributed.checkpoint,
    # reshardable) or a backend's own format; a checkpoint loads only into the same format
    state_format: str = DCPState.name
    # the formats a resume loads: this strategy's own, and transformers.Trainer's (whole weights and
    # optimizer.pt, placed through torch's full-state-dict API) where the strategy loads through that API
    resume_formats: tuple[str, ...] = (DCPState.name, HF_TRAINER_FORMAT)
    # every rank holds the whole optimizer (no sharding): checkpoints write it as HF's optimizer.pt
    replicates_optimizer: bool = False
    # DDP/FSDP/DeepSpeed need a process group even in a world of one
    needs_process_group: bool = False
    # every forward is a collective (sharded parameters are gathered), so all
    # ranks must run the same number of forwards during evaluation too
    eval_needs_all_ranks: bool = False
    # torch_compile per transformer block (the sharding units) instead of the whole model
    compiles_per_block: bool = False

    def __init__(self, args, env: DistEnv | None = None) -> None:
        self.args = args
        self.env = env or read_env()
        # the data-parallel degree and rank, and the mesh sizes; refuses a layout the launch cannot hold
        self.layout = ParallelLayout.resolve(self.env, getattr(args, "parallelism_config", None))
        self.device = torch.device("cpu")
        self.precision = Precision()  # the configured one is made once the device is known
        self._checkpoint_group = None  # background saves' own process group, made at the first one

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def check_environment(cls, env: DistEnv) -> None:
        """Raise before any process group starts if this backend cannot run here."""
        return  # a hook: torch's own backends run wherever torch runs

    def setup_environment(self) -> None:
        """Start the process group (if any) and pick this rank's device."""
        self.device = self._pick_device()
        if self.device.type == "cpu":
            # DeepSpeed, imported by save_pretrained's unwrapping whenever it is installed, would detect
            # the accelerator itself and warn that it fell back to the CPU: tell it what this run uses
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if self.env.is_distributed:
            start_process_group(self.env, self.device, self.args.ddp_backend, self.args.ddp_timeout)
        elif self.needs_process_group and not dist.is_initialized():
            # a private one-rank group keeps the single-process path identical
            # to the multi-rank one (and needs no MASTER_ADDR/PORT)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        self.precision = self._build_precision()
        apply_tf32(self.args.tf32)

    def _build_precision(self) -> Precision:
        if not (self.args.bf16 or self.args.fp16):
            return Precision(device_type=self.device.type)
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16
        backend_casts = self.enable_mixed_precision(dtype)
        scaler = self.make_grad_scaler() if dtype == torch.float16 else None
        return Precision(dtype, self.device.type, backend_casts, scaler)

    def _pick_device(self) -> torch.device:
        device = process_device(self.env, self.args.use_cpu)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def teardown(self) -> None:
        if dist.is_initialized():
            # no rank may tear down while a peer is still inside a collective
            dist.barrier()
            if dist.get_backend() == "gloo":
                # gloo's worker thread frees the barrier's work, and the earlier
                # works it waited on, just after the barrier returns; tensors
                # Python still owns need the GIL to be freed. The process group's
                # destructor joins that thread while holding the GIL, which
                # deadlocked ranks in CI. Releasing the GIL briefly lets it finish.
                time.sleep(0.2)
            dist.destroy_process_group()

    # ---------------------------------------------------------------- model
    def build_model(self, from_pretrained: Callable[[], torch.nn.Module],
                    from_config: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """Construct the model the way this backend wants it built (call after
        setup_environment). `from_pretrained` loads the weights; `from_config`
        builds the same architecture without reading them. Sharded backends
        override this to avoid materialising the full model on every rank."""
        return from_pretrained()

    @abc.abstractmethod
    def setup(self, model: torch.nn.Module,
              optimizer_factory: OptimizerFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place/wrap/shard the model and build its optimizer together."""

    def split_layers(self, model: torch.nn.Module) -> torch.nn.Module:
        """Tensor parallelism over the layout's tp ranks (the model's own plan), and attention over whole rows
        whose slices the sp ranks hold (Ulysses), before any data-parallel wrapping; a no-op without either."""
        layout = self.layout
        if layout.sp > 1:
            from ..parallel.sequence_parallel import use_ulysses_attention

            use_ulysses_attention(model, layout.sp, layout.tp)
        if layout.tp == 1:
            return model
        from ..parallel.tensor_parallel import apply_tensor_parallel

        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise ValueError("parallelism_config tp_size > 1 with a model whose parameters are already "
                             "distributed (loaded with transformers' tp_plan?); load it whole")
        return apply_tensor_parallel(model, layout.tp_mesh(self.device.type))

    def cut_pipeline_stages(self, model: torch.nn.Module) -> torch.nn.Module:
        """With pp_size, `model` pruned in place to this rank's pipeline stages (before it moves to the device:
        no rank holds the whole model there), once; a no-op without pipeline stages."""
        if self.layout.pp > 1 and pipeline_of(model) is None:  # evaluate() before train() sets it up too
            attach(model, Pipeline(model, self.args.parallelism_config, self.layout, agree=self.all_reduce_max))
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run evaluation with; ranks may see different batch counts."""
        return self.unwrap(model).to(self.device)

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Skip gradient reduction on micro-steps that are not the last of a step."""
        return contextlib.nullcontext()

    def whole_parameters(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        """`module`'s own parameters at full size inside the context, for reading
        them before setup() (a model transform); they are whole unless the
        backend partitioned them while the model was built."""
        return contextlib.nullcontext()

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Around every forward: autocast unless the backend casts by itself."""
        return self.precision.forward_context()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale_loss(loss).backward()

    def finish_backward(self, model: torch.nn.Module) -> None:
        """Once per step, after the last micro-batch's backward and before the gradients are read: a
        backend that deferred their reduction completes it here."""
        return  # a hook: torch's wrappers reduce inside backward

    def settled_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train with from the next step on: a backend may re-wrap it once it has seen a
        step (DDP stops searching for unused parameters when there are none)."""
        return model

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """After the last backward of a step, before clipping: true gradients (fp16 loss scaling)."""
        self.precision.unscale_gradients(optimizer)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        pipeline = self.layout.pp_mesh(self.device.type).get_group() if self.layout.pp > 1 else None
        return clip_global_norm_([p for p in self.unwrap(model).parameters() if p.grad is not None], max_norm,
                                 across=pipeline, device=self.device)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """After a step: gradients dropped (their memory freed until the next backward)."""
        optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step; False if it was skipped (inf/NaN gradients under fp16 loss scaling)."""
        return self.precision.optimizer_step(optimizer)

    # ------------------------------------------------------------ precision
    def enable_mixed_precision(self, dtype: torch.dtype) -> bool:
        """Called once, before setup(). True if this backend then computes in `dtype`
        itself (a precision policy); False asks for torch.autocast around forwards."""
        return False

    def make_grad_scaler(self):
        """The fp16 loss scaler to use, or None if the backend scales the loss itself."""
        return torch.amp.GradScaler(self.device.type)

    def loss_scale(self):
        """The fp16 loss scale, for the logs (None: no loss scaling)."""
        return self.precision.loss_scale()

    def discard_gradients(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Drop gradients without stepping (after a memory probe), leaving the
        next step exactly as if the probe had not run."""
        optimizer.zero_grad(set_to_none=True)
        self.unwrap(model).zero_grad(set_to_none=True)

    def reported_grad_norm(self, model: torch.nn.Module):
        """The gradient norm of the last step when the backend computes it
        inside optimizer_step (clip_grad_norm_ returned None); else None."""
        return None

    # ---------------------------------------------------------------- state
    def state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   flat_optimizer: Optional[bool] = None) -> dict[str, Any]:
        """Model (+optimizer) state keyed by parameter FQNs, ready for DCP.
        Frozen parameters (a LoRA base) are left out: they never change, and
        the run rebuilds them from the model source."""
        # pipeline ranks each hold some parameters: the optimizer state must be keyed by parameter name
        # (flattened), or their param_groups lists would collide in the checkpoint
        flat = self.layout.pp > 1 if flat_optimizer is None else flat_optimizer
        options = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=flat)
        module = self.unwrap(model)
        if optimizer is None:
            return {"model": _without_frozen(module, get_model_state_dict(module, options=options))}
        model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
        return {"model": _without_frozen(module, model_sd), "optimizer": optim_sd}

    def load_state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        state: dict[str, Any]) -> None:
        # keys come from state_dict() of this same model and dcp.load has
        # filled every one of them, so only frozen parameters are absent
        flat = not isinstance(state.get("optimizer", {}).get("param_groups"), list)
        options = StateDictOptions(strict=False, ignore_frozen_params=True, flatten_optimizer_state_dict=flat)
        if optimizer is None or "optimizer" not in state:
            set_model_state_dict(self.unwrap(model), state["model"], options=options)
        else:
            set_state_dict(self.unwrap(model), optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=options)

    def save_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Write model (+optimizer) state under `directory`; every rank calls this. With save_on_each_node
        (replicated state only: options.py) each node's first process writes all of it on its own disk."""
        if self.args.save_on_each_node:
            if self.writes_files:
                DCPState.save(self.state_dict(model, optimizer), directory, no_dist=True)
            return
        DCPState.save(self.state_dict(model, optimizer), directory)

    supports_async_save: bool = True

    def prepare_resume(self, saved_world_size: int, accumulation: int) -> None:
        """Called before setup() when resuming: the checkpoint's world size and
        the accumulation that keeps its global batch here. DCP reshards at load
        by itself; backends with their own format adjust here."""
        return  # a hook: nothing to adjust for DCP

    def save_state_async(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        """Stage a copy of the state in host memory and write it in a background
        thread; returns a Future. Its collectives use a process group of their
        own, so they cannot interleave with the training loop's."""
        if self.has_collectives() and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")  # every rank reaches the first save
        return DCPState.save_async(self.state_dict(model, optimizer), directory, self._checkpoint_group)

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """DCP fills this rank's (possibly sharded) state in place, resharding if needed."""
        flat = optimizer is not None and saved_flat_optimizer_state(directory)
        state = self.state_dict(model, optimizer, flat_optimizer=flat)
        DCPState.load(state, directory)
        self.load_state_dict(model, optimizer, state)

    def full_model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded weights on CPU (rank 0 at least; with save_on_each_node, every rank's whole replica,
        since torch hands a CPU-offloaded full state dict to rank 0 only), for HF export."""
        if pipeline_of(self.unwrap(model)) is not None:
            return {name: tensor for name, tensor in self.full_model_tensors(model) if tensor is not None}
        options = StateDictOptions(full_state_dict=True, cpu_offload=not self.args.save_on_each_node)
        return get_model_state_dict(self.unwrap(model), options=options)

    def full_model_tensors(self, model: torch.nn.Module, only: Optional[set[str]] = None
                           ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """The model's state dict (the names in `only`, if given) one whole tensor at a time, in the same
        order on every rank (a sharding backend gathers each in turn, a collective): on CPU for the rank
        that writes files, None elsewhere. HF-format weights are written from it without the whole model
        on one rank (except with pipeline parts, whose tensors are sent to the writing rank)."""
        pipeline = pipeline_of(self.unwrap(model))
        if pipeline is not None:
            yield from self._pipeline_tensors(model, pipeline, only)
            return
        for name, held in self.unwrap(model).state_dict().items():
            if only is not None and name not in only:
                continue
            # a DTensor shard (FSDP2) is gathered on the device the process group communicates on (an
            # offloaded one too)
            whole = held.to(self.device).full_tensor() if isinstance(held, DTensor) else held
            yield name, (whole.detach().cpu() if self.writes_files else None)

    def _pipeline_tensors(self, model: torch.nn.Module, pipeline, only: Optional[set[str]]
                          ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """The whole model's tensors from every pipeline part, in the whole model's order, one at a time: the
        part holding a tensor gathers it (a collective among its ranks) and its first rank sends it to rank 0."""
        owners = pipeline.owners(self.unwrap(model), self.all_gather_object)
        held = self.unwrap(model).state_dict()
        if only is not None:  # each rank names what its own stages hold (a LoRA model's trained tensors)
            only = set().union(*self.all_gather_object(sorted(only)))
        for name, (shape, dtype) in pipeline.full_state.items():
            if only is not None and name not in only:
                continue
            owner = owners[name] * self.layout.ranks_per_part  # the first rank of the part that holds it
            whole = None
            if name in held:
                whole = held[name].to(self.device)
                whole = whole.full_tensor() if isinstance(whole, DTensor) else whole
                if self.rank == owner != 0:
                    dist.send(whole.contiguous(), dst=0)
            elif self.rank == 0:
                whole = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(whole, src=owner)
            yield name, (whole.detach().cpu() if self.writes_files and whole is not None else None)

    def held_state_numel(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """What this rank actually stores, counted from the tensors themselves:
        parameter elements, elements of extra tensors the optimizer steps
        (ZeRO-1/2 keep an fp32 partition beside the full parameters; other
        backends step the parameters themselves: 0), optimizer-state elements
        (e.g. Adam moments), and the bytes of all distinct storages behind them."""
        params = [local_shard(p) for p in self.unwrap(model).parameters()]
        stepped = [local_shard(p) for g in optimizer.param_groups for p in g["params"]]
        states = [local_shard(t) for st in optimizer.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        param_storages = {_storage_key(t) for t in params}
        storages: dict[int, int] = {}
        for t in params + stepped + states:
            storages.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        return {
            "parameters": sum(t.numel() for t in params),
            "optimizer_params": sum(t.numel() for t in stepped if _storage_key(t) not in param_storages),
            "optimizer_state": sum(t.numel() for t in states),
            "bytes": sum(storages.values()),
        }

    # ---------------------------------------------------------- collectives
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def is_local_main(self) -> bool:
        return self.env.is_local_main

    @property
    def shards_with_fsdp2(self) -> bool:
        """Parameters are sharded by FSDP2's fully_shard (DTensors it all-gathers per unit), which lets a
        parameter's tensor subclass choose the all-gather's dtype (float8 all-gather)."""
        return False

    @property
    def module_scoped_parameters(self) -> bool:
        """A module's parameters are whole only inside its own forward and backward (ZeRO-3 gathers and
        releases them per module), so code outside the module must not read them."""
        return False

    @property
    def writes_files(self) -> bool:
        """Whether this process writes checkpoints and saved models (the environment decides, as for HF's
        should_save)."""
        return self.env.writes_files(self.args.save_on_each_node)

    def has_collectives(self) -> bool:
        """Whether collectives reach other ranks (a multi-rank run with its process group up)."""
        return self.env.is_distributed and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, returned). gloo has no AVG for ints: divide yourself."""
        if self.has_collectives():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def batch_all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that divide a step's batch, this rank's tp position's dp x sp ranks in its pipeline
        part (in place, returned): the ranks of a tensor-parallel group and of a pipeline share one batch, so
        counts, losses and samples count once per data-parallel replica and sequence slice."""
        if self.layout.tp == 1 and self.layout.pp == 1:
            return self.all_reduce_sum(tensor)
        if self.has_collectives():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.layout.batch_mesh(self.device.type).get_group())
        return tensor

    def dp_gather_object(self, obj: Any) -> list[Any]:
        """One object per data-parallel rank, in dp order (the first rank of each dp rank's sp x tp block in the
        first pipeline part speaks for it; ranks are laid out pp outermost, sp x tp innermost). Every rank
        calls it."""
        block = self.layout.sp * self.layout.tp
        return self.all_gather_object(obj)[: self.layout.ranks_per_part: block]  # pp rank 0's part speaks

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.has_collectives():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.has_collectives():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.has_collectives():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.has_collectives():
            dist.barrier()

    def describe(self) -> str:
        layout = self.layout
        mesh = f", {layout.describe()}" if max(layout.dp_replicate, layout.tp, layout.sp, layout.pp) > 1 else ""
        if layout.pp > 1:
            config = self.args.parallelism_config
            mesh += f", {config.pp_schedule} over {config.pp_stages} stages"
        return f"{self.name} (world size {self.world_size}, device {self.device}{mesh})"


def clip_global_norm_(params: list[torch.Tensor], max_norm: float, across=None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """torch's clip_grad_norm_ (total norm, then one coefficient for every gradient), over gradients that may
    be DTensors: a sharded gradient's norm is DTensor's own reduction over its shards (FSDP2), and gradients
    on different meshes (tensor-parallel layers on (dp, tp) beside (dp,), or beside plain tensors) get one norm
    per mesh, combined once. `across`: a process group whose ranks hold the other parameters (pipeline parts),
    whose norms combine with this rank's."""
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        grad = param.grad
        by_mesh.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(param)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        total = norms[0]
    elif not norms:  # nothing to clip on this rank (a pipeline part without trainable parameters)
        total = torch.zeros((), device=device)
    else:
        device = params[0].grad.device
        total = torch.stack([n.to(device, torch.float64) ** 2 for n in norms]).sum().sqrt().to(torch.float32)
    if across is not None:
        squared = (total.to(torch.float64) ** 2).reshape(1)
        dist.all_reduce(squared, group=across)
        total = squared.sqrt()[0].to(torch.float32)
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _without_frozen(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """DCP's ignore_frozen_params still returns the second name of a tied frozen
    parameter (a LoRA base's lm_head tied to its embedding): drop every name of
    a frozen parameter."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen} if frozen else state


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
