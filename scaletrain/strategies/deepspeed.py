"""DeepSpeed ZeRO stages 1-3 (optionally offloaded to CPU) behind the Strategy interface.

The DeepSpeed JSON is generated from TrainingArguments. A `deepspeed:` section
may add keys DeepSpeed understands, but a key that scaletrain owns (batch
sizes, accumulation, clipping, stage, offload, precision, optimizer,
scheduler) must be absent, "auto", or equal to the generated value; anything
else is an error naming the argument to set instead.

Accumulation: the trainer already weights each micro-batch by its share of the
global target count, so the engine's own 1/gradient_accumulation_steps scaling
is turned off (the loss is never divided twice), and the trainer marks the
accumulation boundary itself: the engine reduces and steps exactly when the
trainer's step ends, also for a short last step of an epoch.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..checkpoint.state_formats import DEEPSPEED_TAG as CHECKPOINT_TAG
from ..checkpoint.state_formats import DeepSpeedState, weights_only_loads
from ..errors import NotSupportedError
from ..parallel.environment import DistEnv
from .base import OptimizerFactory, Strategy
from .precision import check_full_eval

_AUTO = "auto"


def check_options(args) -> None:
    """ZeRO's offload options, refused under a strategy that cannot honour them."""
    if args.strategy.startswith("zero"):
        check_full_eval(args, "DeepSpeed's partitioned and flattened parameters")
    if args.offload_optimizer and not args.strategy.startswith("zero"):
        raise ValueError(
            f"offload_optimizer=True needs strategy zero1|zero2|zero3 (strategy is {args.strategy!r}); "
            "with fsdp use fsdp_cpu_offload"
        )
    if args.offload_params and args.strategy != "zero3":
        raise ValueError(
            f"offload_params=True needs strategy: zero3 (strategy is {args.strategy!r}); only ZeRO-3 "
            "partitions parameters, so only it can keep them on CPU"
        )


class DeepSpeedConfigError(ValueError):
    pass


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise NotSupportedError(
            "the zero1/zero2/zero3 strategies need DeepSpeed, which is not installed; "
            "pip install 'scaletrain[deepspeed]' (or pick strategy: fsdp, which needs only torch)"
        )


def _owned_values(args, stage: int, world_size: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key path -> (the value scaletrain sets, the argument that controls it)."""
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    offload_device = {True: "cpu", False: "none"}
    return {
        "train_micro_batch_size_per_gpu": (micro, "per_device_train_batch_size"),
        "gradient_accumulation_steps": (gas, "gradient_accumulation_steps"),
        "train_batch_size": (micro * gas * world_size,
                             "per_device_train_batch_size x gradient_accumulation_steps x world size"),
        "gradient_clipping": (float(args.max_grad_norm or 0.0), "max_grad_norm"),
        "zero_optimization.stage": (stage, "strategy (zero1|zero2|zero3)"),
        "zero_optimization.offload_optimizer.device": (offload_device[args.offload_optimizer], "offload_optimizer"),
        "zero_optimization.offload_param.device": (offload_device[args.offload_params], "offload_params"),
        "fp16.enabled": (bool(args.fp16), "fp16"),
        "bf16.enabled": (bool(args.bf16), "bf16"),
        "optimizer": (None, "optim / learning_rate / adam_* / weight_decay (scaletrain builds the optimizer)"),
        "scheduler": (None, "lr_scheduler_type / warmup_* (scaletrain steps the scheduler)"),
    }


_MISSING = object()


def _get_path(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _drop_path(tree: dict, path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        tree = tree.get(part, {})
    tree.pop(parts[-1], None)


def build_deepspeed_config(args, stage: int, world_size: int, on_cuda: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed config for these arguments, with the user's
    `deepspeed` section merged in (conflicts raise DeepSpeedConfigError)."""
    user = copy.deepcopy(args.deepspeed or {})
    owned = _owned_values(args, stage, world_size)
    for path, (ours, argument) in owned.items():
        _reconcile_user_value(user, path, ours, argument)

    config: dict[str, Any] = {
        "steps_per_print": 2**31 - 1,  # progress is the trainer's job
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # a torch optimizer from Trainer.create_optimizer
    }
    for path, (ours, _) in owned.items():
        if ours is not None and not path.endswith(".device"):
            _set_path(config, path, ours)
    if args.offload_optimizer:
        _set_path(config, "zero_optimization.offload_optimizer", {"device": "cpu", "pin_memory": on_cuda})
    if args.offload_params:
        _set_path(config, "zero_optimization.offload_param", {"device": "cpu", "pin_memory": on_cuda})
    if not on_cuda:
        # DeepSpeedCPUAdam needs a ~4 minute JIT build; with offload on a CPU
        # host the torch optimizer does the same step
        config["zero_force_ds_cpu_optimizer"] = False
    return _merge(config, user)


def _reconcile_user_value(user: dict, path: str, ours: Any, argument: str) -> None:
    """A key scaletrain derives from `argument`: the user's value is dropped when it says the same (or
    "auto"), refused when it differs, since two sources of one setting are how configs drift apart."""
    theirs = _get_path(user, path)
    if theirs is _MISSING:
        return
    if theirs != _AUTO:  # HF-style placeholder: "fill it in for me" is what we do anyway
        if ours is None:
            raise DeepSpeedConfigError(
                f"the deepspeed section sets {path!r}; scaletrain owns it, set {argument} instead and remove the key"
            )
        same_number = isinstance(ours, float) and isinstance(theirs, (int, float)) and float(theirs) == ours
        if theirs != ours and not same_number:
            raise DeepSpeedConfigError(
                f"the deepspeed section sets {path}={theirs!r} but scaletrain derives {ours!r} from {argument}; "
                f"set {argument} instead and remove the key (or write \"auto\")"
            )
    _drop_path(user, path)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class DeepSpeedStrategy(Strategy):
    name = "zero"
    state_format = DeepSpeedState.name
    resume_formats = (DeepSpeedState.name,)
    supports_async_save = False  # the engine writes its own files, synchronously
    needs_process_group = True

    @classmethod
    def check_environment(cls, env: DistEnv) -> None:
        _require_deepspeed()

    def __init__(self, args, env=None) -> None:
        super().__init__(args, env)
        self.stage = int(args.strategy[-1])
        self.name = args.strategy
        # ZeRO-3 gathers each layer's parameters inside forward: a collective
        self.eval_needs_all_ranks = self.stage == 3
        if args.save_only_model:
            raise NotSupportedError(
                f"save_only_model=True is not supported with strategy {args.strategy}: DeepSpeed writes model "
                "and optimizer partitions together; keep it False (export weights with Trainer.save_model)"
            )
        if args.save_async:
            raise NotSupportedError(
                f"save_async=True is not supported with strategy {args.strategy}: DeepSpeed writes checkpoints "
                "through its engine, synchronously; leave it False (it works with single, ddp and fsdp)"
            )
        on_cuda = torch.cuda.is_available() and not args.use_cpu
        if args.fp16 and not on_cuda:
            raise NotSupportedError(
                f"fp16=True with strategy {args.strategy} needs a GPU: DeepSpeed refuses fp16 on CPU. Use bf16=True "
                "(DeepSpeed supports it on CPU), or fp16 with strategy ddp or fsdp (torch autocast + GradScaler)"
            )
        self.config = build_deepspeed_config(args, self.stage, self.world_size, on_cuda)
        self.engine = None
        self._hf_zero3 = None
        self._reshard_from = None  # set by prepare_resume when the rank count changed

    def setup_environment(self) -> None:
        super().setup_environment()
        # DeepSpeed insists on LOCAL_RANK even for one process started without a launcher
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        if self.device.type == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU hosts
            # (40-80 s on first use); gloo's all-reduce gives the same results
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        # DeepSpeed 0.19 calls all_gather_into_tensor / reduce_scatter_tensor,
        # deprecated in torch 2.13, on every ZeRO-3 gather: the FutureWarning
        # is repeated per call (1,750 lines in a 30-step QLoRA run) and nothing
        # a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                        r"is deprecated")
        # torch.distributed is initialised by now, so DeepSpeed adopts that group
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # transformers keeps only a weak reference: holding it here makes
            # from_pretrained/from_config partition (and correctly initialise)
            # parameters at construction, and generate() keep ranks in step
            self._hf_zero3 = HfDeepSpeedConfig(self.config)

    def teardown(self) -> None:
        self._hf_zero3 = None
        super().teardown()

    # ---------------------------------------------------------------- model
    def setup(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory):
        import deepspeed

        self._size_buckets(model)
        optimizer = self._offload_friendly(optimizer_factory(model))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                               dist_init_required=False)
        engine.set_gradient_accumulation_boundary(True)
        self.engine = engine
        # The trainer gets the torch optimizer, not the ZeRO wrapper: LR
        # schedulers and HF callbacks need a torch Optimizer, and the wrapper
        # steps through the very same param_groups (lr changes reach it).
        return engine, optimizer

    def _size_buckets(self, model: torch.nn.Module) -> None:
        """Communication buckets sized to the model, as the HF integration's
        "auto" does (hidden_size squared). DeepSpeed's default of 5e8 elements
        allocates a 2 GB fp32 reduction buffer per rank even for a small model.
        Sizes set in the deepspeed section are kept."""
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not hidden:
            return
        zero = self.config.setdefault("zero_optimization", {})
        zero.setdefault("reduce_bucket_size", hidden * hidden)
        if self.stage == 3:
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))

    def _offload_friendly(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """With optimizer offload on a GPU host, step AdamW with DeepSpeed's
        vectorised CPU Adam (same update rule and hyper-parameters)."""
        if not (self.args.offload_optimizer and self.device.type == "cuda" and type(optimizer) is torch.optim.AdamW):
            return optimizer
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        defaults = optimizer.defaults
        return DeepSpeedCPUAdam(optimizer.param_groups, lr=defaults["lr"], betas=defaults["betas"],
                                eps=defaults["eps"], weight_decay=defaults["weight_decay"], adamw_mode=True)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model) if model is self.engine else model

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.unwrap(model)  # ZeRO-3's gather hooks live on the module itself

    @property
    def module_scoped_parameters(self) -> bool:
        return self.stage == 3

    def whole_parameters(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        # read-only gather of what zero.Init partitioned at construction
        return deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=None)

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # micro-batch weights already normalise

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float):
        return None  # the engine clips inside step() (gradient_clipping in its config)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        self.engine.step()
        return self.engine.was_step_applied()  # False after an fp16 overflow

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """engine.step() zeroed the gradients its own way; zero_grad(set_to_none=True) on top dropped the fp32
        partitions' gradients, which ZeRO-1/2 with optimizer offload allocates once and copies into."""
        return

    def enable_mixed_precision(self, dtype: torch.dtype) -> bool:
        # the bf16/fp16 block was generated from the same arguments
        return True

    def make_grad_scaler(self):
        return None  # the engine's dynamic loss scaler (fp16 block)

    def discard_gradients(self, model: torch.nn.Module, optimizer) -> None:
        """Gradients of a probe backward live in stage-specific buffers, and
        the ZeRO optimizers count micro-steps; a plain zero_grad leaves stage 2
        adding the probe into the next step and stage 3 copying/adding wrongly.
        Verified: training after probes + this is identical (==) to training
        without probes, stages 1-3, fp32 and bf16, 1 and 2 ranks."""
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        zero = self.engine.optimizer
        if isinstance(zero, BF16_Optimizer):
            zero.zero_grad(set_to_none=True)
        elif self.stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            zero.zero_grad(set_to_none=True)
            zero._release_preflattened_grad_buffers()
            for key in list(zero.averaged_gradients):
                zero.averaged_gradients[key] = None
            for key in list(zero.all_grad_tensors):
                zero.all_grad_tensors[key] = None
            zero.micro_step_id = INITIAL_MICRO_STEP_ID
        else:
            zero.zero_grad(set_to_none=True)  # resets the micro-step count: the next backward copies
            zero.grad_partitions_flat_buffer.zero_()  # parameters unused next step must not keep probe gradients
        self.engine.zero_grad()
        self.engine.set_gradient_accumulation_boundary(True)

    def loss_scale(self):
        optimizer = getattr(self.engine, "optimizer", None)
        scale = getattr(optimizer, "cur_scale", None) if self.args.fp16 else None
        return float(scale) if scale is not None else None

    def reported_grad_norm(self, model: torch.nn.Module):
        return self.engine.get_global_grad_norm()

    # ---------------------------------------------------------------- state
    def save_state(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        # the `latest` file is needed: DeepSpeed's ZeRO-3 module-only load (the
        # best model at the end) looks the tag up there
        # frozen parameters (a LoRA base) are rebuilt from the model source
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=True,
                                    exclude_frozen_parameters=True)

    def prepare_resume(self, saved_world_size: int, accumulation: int) -> None:
        self.config["gradient_accumulation_steps"] = accumulation
        self.config["train_batch_size"] = self.args.per_device_train_batch_size * accumulation * self.world_size
        self._reshard_from = saved_world_size if saved_world_size != self.world_size else None
        if self._reshard_from:
            # partitions saved for another rank count load through DeepSpeed's
            # universal format, converted from the checkpoint on the fly
            self.config.setdefault("checkpoint", {})["load_universal"] = True

    def load_state(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        if self._reshard_from and optimizer is not None:
            self._reshard_from = None
            with self._universal_copy(directory) as universal:
                self._load(universal, model, optimizer)
                if self.stage == 3:
                    self._repair_zero3_universal_optimizer(universal)
            self.engine._config.load_universal_checkpoint = False  # later loads (best model) are native
        else:
            self._load(directory, model, optimizer)

    def _repair_zero3_universal_optimizer(self, universal: Path) -> None:
        """Undo two side effects of DeepSpeed's ZeRO-3 universal load (0.19):
        it gives every sub-group's optimizer state one shared `step` tensor,
        which torch Adam then advances once per sub-group per step (measured:
        the resumed loss drifts 2e-6 after one step and 4e-4 after fifteen),
        and it copies param group 0's hyperparameters into every group (a
        no-decay group would decay). ZeRO-1/2 universal loads do neither."""
        zero_optimizer = self.engine.optimizer
        state = zero_optimizer.optimizer.state
        for flat in zero_optimizer.fp32_partitioned_groups_flat:
            step = state[flat].get("step")
            if torch.is_tensor(step):
                state[flat]["step"] = step.clone()
        with weights_only_loads():
            saved_groups = torch.load(universal / CHECKPOINT_TAG / "zero" / "optimizer_state.pt")["param_groups"]
        for group, saved_group in zip(zero_optimizer.optimizer.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    @contextlib.contextmanager
    def _universal_copy(self, directory: Path) -> Iterator[Path]:
        """DeepSpeed's universal checkpoint of `directory`, written next to the
        checkpoint (shared storage on multi-node runs) and removed after loading;
        the committed checkpoint itself is never modified."""
        import shutil
        from argparse import Namespace

        target = directory.parent.parent / f".{directory.parent.name}-universal"
        if self.is_main:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(target, ignore_errors=True)
            with weights_only_loads():
                ds_to_universal(Namespace(input_folder=str(directory / CHECKPOINT_TAG),
                                          output_folder=str(target / CHECKPOINT_TAG), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True,
                                          inject_missing_state=True))
        self.barrier()
        try:
            yield target
        finally:
            self.barrier()
            if self.is_main:
                shutil.rmtree(target, ignore_errors=True)

    def _load(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        with weights_only_loads():
            loaded, _ = self.engine.load_checkpoint(
                str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=optimizer is not None,
                load_lr_scheduler_states=False, load_module_only=optimizer is None,
                load_module_strict=all(p.requires_grad for p in self.unwrap(model).parameters()),
            )
        if loaded is None:
            from ..checkpoint import CheckpointError

            raise CheckpointError(f"{directory} holds no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}); was it "
                                  f"saved with a DeepSpeed strategy?")

    def state_dict(self, model, optimizer):
        raise NotSupportedError("DeepSpeed state is saved through the engine (save_state), not as a state dict")

    def full_model_tensors(self, model: torch.nn.Module, only: Optional[set[str]] = None
                           ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        if self.stage != 3:
            yield from super().full_model_tensors(model, only)
            return
        import deepspeed

        for name, tensor in self.unwrap(model).state_dict(keep_vars=True).items():
            if only is not None and name not in only:
                continue
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partition: gathered for this tensor only
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    whole = tensor.detach().cpu().clone() if self.writes_files else None
            else:
                whole = tensor.detach().cpu() if self.writes_files else None
            yield name, whole

    def full_model_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()  # keeps fp32 when training in fp32
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def build_model(self, from_pretrained: Callable[[], torch.nn.Module],
                    from_config: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if self.stage == 3 and self._hf_zero3 is None:
            raise RuntimeError("call setup_environment() before build_model() under zero3")
        return from_pretrained()
