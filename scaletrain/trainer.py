"""The training loop: train / evaluate / predict with the Hugging Face Trainer API.

The loop is backend-agnostic: everything that differs between single-device,
DDP and the sharded backends is a method of the Strategy object.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import DataCollatorWithPadding, default_data_collator, get_scheduler
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState
from transformers.trainer_pt_utils import get_parameter_names, nested_concat, nested_detach, nested_numpify
from transformers.trainer_utils import (
    EvalLoopOutput,
    EvalPrediction,
    PredictionOutput,
    SaveStrategy,
    TrainOutput,
    set_seed,
)
from transformers.utils import find_labels

from .args import NotSupportedError, TrainingArguments
from .callbacks import JsonlMetricsCallback, ProgressCallback, WandbCallback
from .checkpoint import CheckpointError, CheckpointManager, resolve_resume_target
from .checkpoint.compatibility import check_same_model, model_fingerprint
from .checkpoint.manager import PREFIX as CHECKPOINT_PREFIX
from .checkpoint.manager import capture_rng_state, restore_rng_state
from .data.loaders import (
    build_eval_dataloader, build_train_dataloader, prepare_dataset, signature_columns, stream_replay_reason,
    training_stream,
)
from .data.samplers import ResumableShardedSampler, ShardedIterable
from .distributed import configure_threads
from .memory import PeakMemory, device_memory_capacity, optimizer_state_bytes_to_come, parse_bytes
from .middleware import build_middleware
from .middleware.batch_finder import BatchSizeChoice
from .middleware.batch_finder import choose as choose_batch_size
from .strategies import Strategy, build_strategy

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
# transformers.Trainer.get_decay_parameter_names' patterns, searched in lower-cased parameter names
_NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
_NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


class Trainer:
    """Drop-in for `transformers.Trainer` (same constructor and methods)."""

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        args: Optional[TrainingArguments] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Optional[Dataset] = None,
        eval_dataset: Optional[Union[Dataset, dict[str, Dataset]]] = None,
        processing_class: Any = None,
        model_init: Optional[Callable[..., torch.nn.Module]] = None,
        compute_loss_func: Optional[Callable] = None,
        compute_metrics: Optional[Callable[[EvalPrediction], dict]] = None,
        callbacks: Optional[list] = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Optional[tuple] = None,
        preprocess_logits_for_metrics: Optional[Callable] = None,
        tokenizer: Any = None,
        strategy: Optional[Strategy] = None,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        if not hasattr(args, "strategy"):
            raise TypeError(
                f"args is a {type(args).__module__}.{type(args).__name__}; pass scaletrain.TrainingArguments "
                "(same field names) so every option is either honoured or refused"
            )
        if tokenizer is not None:
            warnings.warn("`tokenizer` is deprecated; pass `processing_class`", FutureWarning, stacklevel=2)
            processing_class = processing_class if processing_class is not None else tokenizer
        if compute_loss_func is not None:
            raise NotSupportedError(
                "compute_loss_func is not supported yet by scaletrain; override Trainer.compute_loss and return "
                "the micro-batch mean loss (the trainer normalises by the global token count itself)"
            )
        if optimizer_cls_and_kwargs is not None and optimizers[0] is not None:
            raise ValueError("pass either optimizers or optimizer_cls_and_kwargs, not both")
        self.strategy = strategy if strategy is not None else build_strategy(args)
        # the launcher may have added settings (accelerate's --mixed_precision, --use_fsdp, ...)
        self.args = args = self.strategy.args if strategy is None else args
        self.strategy.setup_environment()
        self.middleware = build_middleware(args, self.strategy)
        self.num_threads = configure_threads(self.strategy.env, args.torch_threads)
        set_seed(args.seed)

        if model is None:
            if model_init is None:
                raise ValueError("Trainer needs a model or a model_init")
            model = self._call_model_init(model_init)
        elif model_init is not None:
            raise ValueError("pass either model or model_init, not both")
        self.model_init = model_init
        self.model = model
        _apply_use_cache(model, args.use_cache)
        self.model_wrapped: Optional[torch.nn.Module] = None
        self.processing_class = processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        if data_collator is None:
            data_collator = (
                DataCollatorWithPadding(processing_class)
                if processing_class is not None and hasattr(processing_class, "pad")
                else default_data_collator
            )
        self.data_collator = data_collator
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.label_names = args.label_names if args.label_names is not None else find_labels(type(self.model))
        self.checkpoints = CheckpointManager(args.output_dir, self.strategy)

        default_callbacks: list = [DefaultFlowCallback, JsonlMetricsCallback()]
        if not args.disable_tqdm:
            default_callbacks.append(ProgressCallback())
        if "wandb" in args.report_to:
            default_callbacks.append(WandbCallback())
        self.callback_handler = CallbackHandler(
            default_callbacks + list(callbacks or []), self.model, processing_class, self.optimizer, self.lr_scheduler
        )
        self.state = TrainerState(
            is_local_process_zero=self.strategy.is_local_main, is_world_process_zero=self.strategy.is_main
        )
        self.control = TrainerControl()
        self._label_shift: Optional[int] = None
        self._skipped_steps = 0
        self._longest_example = None  # (row, collator), for the batch finder's probes
        self.batch_size_choice: Optional[BatchSizeChoice] = None
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ---------------------------------------------------------------- public
    def is_world_process_zero(self) -> bool:
        return self.strategy.is_main

    def is_local_process_zero(self) -> bool:
        return self.strategy.is_local_main

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def hyperparameter_search(self, *args, **kwargs):
        raise NotSupportedError("hyperparameter_search is not supported yet by scaletrain")

    # ------------------------------------------------------------- dataloaders
    def _columns(self) -> Optional[list[str]]:
        if not self.args.remove_unused_columns:
            return None
        return signature_columns(_library_model(self.strategy.unwrap(self.model)), self.label_names)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs a train_dataset")
        dataset, collator = prepare_dataset(self.train_dataset, self.data_collator, self._columns(), "training")
        return build_train_dataloader(dataset, collator, self.args, self.strategy.rank, self.strategy.world_size,
                                      self.strategy.device)

    def get_eval_dataloader(self, eval_dataset: Optional[Union[str, Dataset]] = None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset")
        return self._sharded_eval_loader(dataset, "evaluation")

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        return self._sharded_eval_loader(test_dataset, "test")

    def _sharded_eval_loader(self, dataset: Dataset, description: str) -> DataLoader:
        dataset, collator = prepare_dataset(dataset, self.data_collator, self._columns(), description)
        return build_eval_dataloader(dataset, collator, self.args, self.strategy.rank, self.strategy.world_size,
                                     self.strategy.device)

    # ------------------------------------------------------ optimizer / sched
    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Weight decay applies to weights, not to biases or normalisation layers: HF's rule (norm layers by
        type, and by name, which catches model-specific norms such as LlamaRMSNorm)."""
        return get_parameter_names(model, list(_NORM_LAYERS), _NO_DECAY_NAME_PATTERNS)

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.strategy.unwrap(self.model)
        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
            self.optimizer = cls(groups, **kwargs)
        elif args.optim == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
        else:
            self.optimizer = torch.optim.AdamW(
                groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                fused=args.optim == "adamw_torch_fused" or None,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer if optimizer is not None else self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
            )
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps, self.optimizer)

    # ------------------------------------------------------------------- loss
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[int] = None):
        """The micro-batch's mean loss, as the model computes it. The trainer
        re-weights micro-batches itself (see `_loss_weights`), so an override
        should return a mean too."""
        outputs = model(**inputs)
        if isinstance(outputs, dict):
            if "loss" not in outputs or outputs["loss"] is None:
                raise ValueError(
                    f"the model returned no loss (keys: {sorted(outputs.keys())}); the batch needs labels "
                    f"({self.label_names}) or override Trainer.compute_loss"
                )
            loss = outputs["loss"]
        else:
            loss = outputs[0]
        return (loss, outputs) if return_outputs else loss

    def _count_loss_items(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """How many targets the model's mean loss averages over in this micro-batch,
        as a tensor where the labels are: counting must not wait for the device."""
        labels = inputs.get(self.label_names[0]) if len(self.label_names) == 1 else None
        if not isinstance(labels, torch.Tensor):
            return None
        if labels.is_floating_point():
            return torch.tensor(labels.numel(), device=labels.device)
        if self._label_shift is None:
            model = _library_model(self.strategy.unwrap(self.model))
            # sharding backends may swap the class for a subclass (FSDP2): look along the MRO
            is_causal = any(cls.__name__ in _causal_lm_class_names() for cls in type(model).__mro__)
            self._label_shift = 1 if is_causal and not getattr(model.config, "is_encoder_decoder", False) else 0
        if self._label_shift and labels.dim() >= 2:
            labels = labels[..., self._label_shift:]
        return (labels != IGNORE_INDEX).sum()

    def _loss_weights(self, micro_batches: list[dict[str, Any]]
                      ) -> tuple[list[Union[float, torch.Tensor]], Optional[torch.Tensor]]:
        """Per-micro-batch weights making the step's gradient the mean over all
        valid targets of the global batch (all micro-batches, all ranks).

        Gradients are averaged over ranks by the strategy, hence the world-size
        factor. Without countable labels, micro-batch means are averaged. The
        weights stay on the device (no host sync); with no target anywhere they are 0.
        """
        counts = [self._count_loss_items(b) for b in micro_batches]
        if any(c is None for c in counts):
            return [1.0 / len(micro_batches)] * len(micro_batches), None
        # host-side counts reach the device without waiting for it (an async copy)
        counts = [c.to(self.strategy.device, torch.float64, non_blocking=True) for c in counts]
        global_items = self.strategy.all_reduce_sum(torch.stack(counts).sum().reshape(1))[0]
        world = self.strategy.world_size
        return [c * world / global_items.clamp_min(1.0) for c in counts], global_items

    def compute_loss_context_manager(self):
        """Around every forward: autocast when the precision middleware asks for it."""
        return self.middleware.forward_context()

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = self.strategy.device
        if device.type == "cpu":
            return inputs
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[int] = None,
                      loss_weight: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the weighted loss, detached."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if isinstance(loss_weight, torch.Tensor):
            loss = loss * loss_weight.to(loss.dtype)
        elif loss_weight != 1.0:
            loss = loss * loss_weight
        self.strategy.backward(self.middleware.scale_loss(loss))
        return loss.detach()

    # ------------------------------------------------------------------ train
    def _call_model_init(self, model_init, trial=None) -> torch.nn.Module:
        import inspect

        n_args = len(inspect.signature(model_init).parameters)
        model = model_init(trial) if n_args == 1 else model_init()
        if model is None:
            raise ValueError("model_init returned None")
        return model

    def _setup_model(self) -> None:
        """Middleware first (precision policy, activation checkpointing), then
        the strategy wraps/shards the model and builds its optimizer."""
        self.middleware.configure_strategy(self.strategy)
        self.model = model = self.middleware.transform_model(self.model, self.strategy)
        user_optimizer = self.optimizer
        self.model_wrapped, self.optimizer = self.strategy.setup(
            model, lambda module: user_optimizer if user_optimizer is not None else self.create_optimizer(module))

    # ----------------------------------------------------------- batch finder
    def _find_batch_size(self) -> BatchSizeChoice:
        """Pre-flight (see middleware/batch_finder.py): measure real training
        micro-steps at the longest sequence, pick the micro-batch, keep the
        global batch. Leaves no trace: gradients dropped, RNG restored."""
        args = self.args
        budget = self._memory_budget()
        rng = capture_rng_state()
        try:
            choice = choose_batch_size(self.measure_step_memory, budget, args.per_device_train_batch_size,
                                       args.gradient_accumulation_steps)
        finally:
            restore_rng_state(rng)
        logger.info(choice.summary(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                      self.strategy.world_size))
        self.args = dataclasses.replace(args, per_device_train_batch_size=choice.per_device,
                                        gradient_accumulation_steps=choice.accumulation)
        return choice

    def measure_step_memory(self, micro_batch: int) -> int:
        """Peak bytes per rank (the most over ranks; every rank must call this)
        of one training micro-step of `micro_batch` copies of the longest
        training example: the state held before it, plus what forward and
        backward allocate, plus optimizer state that is not allocated yet. The
        gradients are discarded; the model must be set up (train() does it)."""
        if self._longest_example is None:
            dataset, collator = prepare_dataset(self.train_dataset, self.data_collator, self._columns(), "training")
            self._longest_example = (_longest_row(dataset), collator)
        row, collator = self._longest_example
        self.model_wrapped.train()
        batch = self._prepare_inputs(collator([row] * micro_batch))
        with PeakMemory(self.strategy.device) as peak:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(self.model_wrapped, batch)
            self.strategy.backward(self.middleware.scale_loss(loss))
            del loss
        self.strategy.discard_gradients(self.model_wrapped, self.optimizer)
        held = peak.baseline if peak.baseline is not None else \
            self.strategy.held_state_numel(self.model_wrapped, self.optimizer)["bytes"]
        total = held + peak.peak + optimizer_state_bytes_to_come(self.optimizer)
        # every rank follows the worst rank's measurement, so all take the same path
        worst = torch.tensor([float(total)], dtype=torch.float64, device=self.strategy.device)
        return int(self.strategy.all_reduce_max(worst).item())

    def _memory_budget(self) -> int:
        if self.args.batch_finder_memory_budget is not None:
            return parse_bytes(self.args.batch_finder_memory_budget, "batch_finder_memory_budget")
        capacity = device_memory_capacity(self.strategy.device)
        if capacity is None:
            raise ValueError("auto_find_batch_size on CPU needs batch_finder_memory_budget (e.g. '4GiB'): a CPU "
                             "has no device memory to fill")
        return int(capacity * 0.9)  # headroom for the allocator's fragmentation and communication buffers

    def _plan(self, loader: DataLoader) -> tuple[int, int, Optional[int]]:
        """(max_steps, epochs, micro-batches per epoch or None for iterables)."""
        args = self.args
        try:
            per_epoch: Optional[int] = len(loader)
        except TypeError:
            per_epoch = None
        if per_epoch is None:
            if args.max_steps <= 0:
                raise ValueError("the training dataset has no length (IterableDataset): set max_steps")
            return args.max_steps, 2**31 - 1, None
        if per_epoch == 0:
            raise ValueError(
                f"the training dataloader is empty on rank {self.strategy.rank} (dataset too small for "
                f"per_device_train_batch_size={args.per_device_train_batch_size} with drop_last)"
            )
        updates_per_epoch = max(math.ceil(per_epoch / self._accumulation), 1)
        if args.max_steps > 0:
            return args.max_steps, math.ceil(args.max_steps / updates_per_epoch), per_epoch
        max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
        return max_steps, math.ceil(args.num_train_epochs), per_epoch

    def _interval(self, value: Optional[float], max_steps: int, fallback: int) -> int:
        if value is None:
            return fallback
        return max(1, math.ceil(max_steps * value)) if value < 1 else int(value)

    def _model_fingerprint(self) -> dict[str, Any]:
        model = self.strategy.unwrap(self.model)
        return model_fingerprint(model, _model_class_name(model))

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None,
              ignore_keys_for_eval: Optional[list[str]] = None, **kwargs) -> TrainOutput:
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        args = self.args
        resume_path = resolve_resume_target(resume_from_checkpoint, args.output_dir)
        if self.model_init is not None:
            set_seed(args.seed)
            self.model = self._call_model_init(self.model_init, trial)
            _apply_use_cache(self.model, args.use_cache)
            self.optimizer, self.lr_scheduler = None, None
        # accumulation may change on resume (another world size, same global batch)
        self._accumulation = (self._accumulation_for_resume(resume_path) if resume_path
                              else args.gradient_accumulation_steps)
        args = self.args  # a resume may adopt the batch finder's earlier choice
        loader = self.get_train_dataloader()
        max_steps, num_epochs, per_epoch = self._plan(loader)

        self._setup_model()
        if args.auto_find_batch_size and resume_path is None:
            self.batch_size_choice = self._find_batch_size()
            args = self.args  # with the chosen per-device batch and accumulation
            self._accumulation = args.gradient_accumulation_steps
            loader = self.get_train_dataloader()
            max_steps, num_epochs, per_epoch = self._plan(loader)
        self.create_scheduler(max_steps, self.optimizer)

        self.state = TrainerState(
            max_steps=max_steps,
            num_train_epochs=num_epochs,
            train_batch_size=args.per_device_train_batch_size,
            logging_steps=self._interval(args.logging_steps, max_steps, 500),
            save_steps=self._interval(args.save_steps, max_steps, 500),
            is_local_process_zero=self.strategy.is_local_main,
            is_world_process_zero=self.strategy.is_main,
            trial_name=None,
        )
        self.state.eval_steps = self._interval(args.eval_steps, max_steps, self.state.logging_steps)
        start_epoch, skip_micro = 0, 0
        self._skipped_steps = 0  # optimizer steps skipped on fp16 overflow, over the whole run
        self._train_loader, self._resumed_stream_state = loader, None
        if resume_path is not None:
            start_epoch, skip_micro = self._resume(resume_path, max_steps)
        if self.strategy.is_main:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)

        handler = self.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = self.model, self.optimizer, self.lr_scheduler
        handler.train_dataloader = loader
        logger.info("training with %s, %d threads/rank, %d steps", self.strategy.describe(), self.num_threads,
                    max_steps)
        self.control = handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and self.eval_dataset is not None:
            self._evaluate_and_track(ignore_keys_for_eval)

        self._reset_log_window()
        self._position = (start_epoch, skip_micro)
        device = self.strategy.device
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        total_tokens = torch.zeros((), dtype=torch.int64, device=device)
        total_steps, total_samples = 0, 0
        train_start = time.perf_counter()
        self.model_wrapped.train()
        gas = self._accumulation
        for epoch in range(start_epoch, num_epochs):
            micro_done = skip_micro if epoch == start_epoch else 0
            replay = self._start_epoch(loader, epoch, micro_done)
            self.control = handler.on_epoch_begin(args, self.state, self.control)
            batches = _iter_keeping_rng(loader)
            for _ in range(replay):
                next(batches)
            exhausted = False
            while not exhausted:
                micro_batches = []
                for _ in range(gas):
                    try:
                        micro_batches.append(next(batches))
                    except StopIteration:
                        exhausted = True
                        break
                if not micro_batches:
                    break
                self.control = handler.on_step_begin(args, self.state, self.control)
                step_loss, samples, tokens = self._optimizer_step(micro_batches)
                micro_done += len(micro_batches)
                total_loss += step_loss.double()
                total_steps += 1
                total_samples += samples
                total_tokens += tokens

                self.state.global_step += 1
                self.state.epoch = epoch + (micro_done / per_epoch if per_epoch else 0.0)
                self._position = (epoch, micro_done)
                self.control = handler.on_step_end(args, self.state, self.control)
                self._maybe_log_save_evaluate(ignore_keys_for_eval)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if exhausted or (per_epoch is not None and micro_done >= per_epoch):
                self.state.epoch = float(epoch + 1)
                self._position = (epoch + 1, 0)
            # like the HF Trainer: epoch-end events also fire when max_steps ends the epoch early
            self.control = handler.on_epoch_end(args, self.state, self.control)
            self._maybe_log_save_evaluate(ignore_keys_for_eval)
            if self.control.should_training_stop or self.state.global_step >= max_steps:
                break

        self.checkpoints.finish_pending()  # a background save is committed before training returns
        runtime = time.perf_counter() - train_start
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info("loading best model from %s (%s=%s)", self.state.best_model_checkpoint,
                        args.metric_for_best_model, self.state.best_metric)
            self.checkpoints.load_model(self.state.best_model_checkpoint, self.model_wrapped)
        totals = torch.stack([torch.tensor(float(total_samples), dtype=torch.float64, device=device),
                              total_tokens.double(), total_loss])
        global_samples, global_tokens, loss_sum = self.strategy.all_reduce_sum(totals).tolist()
        train_loss = loss_sum / max(total_steps, 1)
        metrics = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(global_samples / runtime, 3) if runtime > 0 else 0.0,
            "train_tokens_per_second": round(global_tokens / runtime, 3) if runtime > 0 else 0.0,
            "train_steps_per_second": round(total_steps / runtime, 3) if runtime > 0 else 0.0,
            "train_loss": train_loss,
            "epoch": self.state.epoch,
        }
        self.log(metrics)
        self.control = handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _start_epoch(self, loader: DataLoader, epoch: int, skip_micro: int) -> int:
        """Position the loader `skip_micro` micro-batches into `epoch`; returns how
        many micro-batches must still be drawn and dropped (0 unless a stream
        cannot restore its saved position)."""
        sampler = loader.sampler
        if isinstance(sampler, ResumableShardedSampler):
            sampler.set_epoch(epoch)
            if skip_micro:
                sampler.set_start(min(skip_micro * loader.batch_size, sampler.per_rank))
            return 0
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        if not skip_micro:
            return 0
        reason = stream_replay_reason(loader)
        if reason is None and self._resumed_stream_state is not None:
            training_stream(loader).load_state_dict(self._resumed_stream_state)
            return 0
        reason = reason or "the checkpoint holds no stream position"
        logger.warning("resuming mid-stream by replaying %d micro-batches: %s", skip_micro, reason)
        return skip_micro

    def _optimizer_step(self, micro_batches: list[dict[str, Any]]) -> tuple[torch.Tensor, int, int]:
        """One optimizer step over this rank's micro-batches. Returns this rank's
        share of the step's global mean loss, its sample and token counts."""
        handler, args = self.callback_handler, self.args
        weights, global_items = self._loss_weights(micro_batches)
        step_loss = torch.zeros((), device=self.strategy.device)
        samples, tokens = 0, torch.zeros((), dtype=torch.int64, device=self.strategy.device)
        last = len(micro_batches) - 1
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            samples += _batch_size(batch)
            tokens += _token_count(batch)
            sync = contextlib.nullcontext() if i == last else self.strategy.no_sync(self.model_wrapped)
            with sync:
                step_loss += self.training_step(self.model_wrapped, batch, global_items, loss_weight=weight)
            if i != last:
                self.control = handler.on_substep_end(args, self.state, self.control)
        self.middleware.before_optimizer_step(self.optimizer)  # e.g. unscale fp16 gradients
        self.control = handler.on_pre_optimizer_step(args, self.state, self.control)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            self._last_grad_norm = self.strategy.clip_grad_norm_(self.model_wrapped, args.max_grad_norm)
        stepped = self.middleware.optimizer_step(self.optimizer, lambda: self.strategy.optimizer_step(self.optimizer))
        if args.max_grad_norm is not None and args.max_grad_norm > 0 and self._last_grad_norm is None:
            self._last_grad_norm = self.strategy.reported_grad_norm(self.model_wrapped)
        self.control = handler.on_optimizer_step(args, self.state, self.control)
        if stepped:
            self.lr_scheduler.step()
        else:  # an fp16 overflow: the weights did not move, so neither does the schedule
            self._skipped_steps += 1
            logger.info("step %d skipped: inf/NaN gradients (fp16 overflow)", self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)

        step_loss = step_loss / self.strategy.world_size
        finite = torch.isfinite(step_loss)
        if args.logging_nan_inf_filter:
            self._loss_in_window += torch.where(finite, step_loss, torch.zeros_like(step_loss))
            self._finite_steps_in_window += finite.to(torch.float32)
        else:
            self._loss_in_window += step_loss
            self._finite_steps_in_window += 1.0
        self._samples_in_window += samples
        self._tokens_in_window += tokens
        return step_loss.detach(), samples, tokens

    # ----------------------------------------------------------------- logging
    def _reset_log_window(self) -> None:
        device = self.strategy.device
        self._loss_in_window = torch.zeros((), device=device)
        self._finite_steps_in_window = torch.zeros((), device=device)
        self._samples_in_window = 0
        self._tokens_in_window = torch.zeros((), dtype=torch.int64, device=device)
        self._window_start = time.perf_counter()
        self._last_grad_norm: Optional[torch.Tensor] = None

    def _flush_log_window(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        packed = torch.stack([
            self._loss_in_window.double(), self._finite_steps_in_window.double(),
            torch.tensor(float(self._samples_in_window), dtype=torch.float64, device=self.strategy.device),
            self._tokens_in_window.double(),
        ])
        reduced = self.strategy.all_reduce_sum(packed)
        norm = self._last_grad_norm
        if isinstance(norm, torch.Tensor):  # the same global norm on every rank: read in the same transfer
            reduced = torch.cat([reduced, norm.detach().reshape(1).to(reduced)])
        values = reduced.tolist()  # the window's one host sync
        loss_sum, finite_steps, samples, tokens = values[:4]
        world = self.strategy.world_size
        logs = {
            # every rank counted each finite step once
            "loss": loss_sum / max(finite_steps / world, 1e-9) if finite_steps else float("nan"),
            "learning_rate": float(self.lr_scheduler.get_last_lr()[0]),
            "train_samples_per_second": samples / elapsed,
            "train_tokens_per_second": tokens / elapsed,
        }
        if norm is not None:
            logs["grad_norm"] = values[4] if isinstance(norm, torch.Tensor) else float(norm)
        logs.update(self.middleware.log_values())
        if self.middleware.items:
            logs["skipped_steps"] = self._skipped_steps
        self._reset_log_window()
        return logs

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.state.epoch is not None:
            logs = {**logs, "epoch": logs.get("epoch", self.state.epoch)}
        if start_time is not None:
            logs["total_runtime"] = round(time.perf_counter() - start_time, 4)
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _maybe_log_save_evaluate(self, ignore_keys_for_eval: Optional[list[str]]) -> None:
        if self.control.should_log:
            self.log(self._flush_log_window())
        paused = time.perf_counter()
        if self.control.should_evaluate:
            self._evaluate_and_track(ignore_keys_for_eval)
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        # training throughput should not count time spent evaluating or saving
        self._window_start += time.perf_counter() - paused

    def _evaluate_and_track(self, ignore_keys: Optional[list[str]]) -> dict[str, float]:
        if isinstance(self.eval_dataset, dict):
            metrics: dict[str, float] = {}
            for name, dataset in self.eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, metric_key_prefix=f"eval_{name}"))
        else:
            metrics = self.evaluate(ignore_keys=ignore_keys)
        if self._update_best(metrics) and self.args.save_strategy == SaveStrategy.BEST:
            self.control.should_save = True
        if self.model_wrapped is not None:
            self.model_wrapped.train()
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> bool:
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"metric_for_best_model={name!r}: {key!r} is not among the evaluation metrics {sorted(metrics)}"
            )
        value = float(metrics[key])
        better = np.greater if self.args.greater_is_better else np.less
        if self.state.best_metric is None or better(value, self.state.best_metric):
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
            return True
        return False

    # ---------------------------------------------------------------- saving
    def _save_checkpoint(self) -> Path:
        step = self.state.global_step
        final = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}-{step}"
        if self.state.best_global_step == step:
            self.state.best_model_checkpoint = str(final)
        epoch, micro_done = getattr(self, "_position", (0, 0))
        path = self.checkpoints.save(
            step, self.model_wrapped, self.optimizer, self.lr_scheduler, self.state,
            progress={"epoch": epoch, "micro_batches_in_epoch": micro_done, "global_step": step,
                      "per_device_train_batch_size": self.args.per_device_train_batch_size,
                      "gradient_accumulation_steps": self._accumulation,
                      "skipped_steps": self._skipped_steps,
                      "middleware": self.middleware.state_dict(),
                      # what a run on another world size needs to find the same place
                      "samples_in_epoch": micro_done * self.args.per_device_train_batch_size * self.strategy.world_size,
                      "stream_state": self._stream_state(micro_done)},
            manifest_extra={"model_fingerprint": self._model_fingerprint(), "base_model": self._adapter_base(),
                            "model_class": _model_class_name(self.strategy.unwrap(self.model))},
            save_only_model=self.args.save_only_model,
            write_model_files=self._write_model_files,
            asynchronous=self.args.save_async,
        )
        best = Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
        self.checkpoints.rotate(self.args.save_total_limit, keep={best} if best else set())
        self.strategy.barrier()
        return path

    def _stream_state(self, micro_done: int) -> Optional[dict]:
        """A training stream's position (its state_dict()) when a resume can restore
        it; the same on every rank, as every rank reads the whole stream."""
        loader = getattr(self, "_train_loader", None)
        stream = training_stream(loader) if loader is not None else None
        if stream is None or not micro_done or stream_replay_reason(loader) is not None:
            return None
        state = stream.state_dict()
        try:
            json.dumps(state)
        except (TypeError, ValueError):
            logger.warning("the training stream's state_dict() is not JSON data; a resume will replay batches")
            return None
        return state

    def _accumulation_for_resume(self, path: Path) -> int:
        """Gradient accumulation that keeps the checkpoint's global batch on this
        world size; every incompatibility is raised before any state is loaded."""
        manifest = self.checkpoints.read_manifest(path)
        saved_format = manifest.get("state_format", "dcp")
        if saved_format != self.strategy.state_format:
            raise CheckpointError(
                f"{path} holds {saved_format!r} state (saved by strategy {manifest['strategy']}); strategy "
                f"{self.strategy.name} reads {self.strategy.state_format!r}. Resume with a strategy of the same "
                f"family, or export it (scaletrain export) and start from the weights"
            )
        progress = json.loads((path / "progress.json").read_text())
        self._adopt_found_batch_size(path, progress, manifest["world_size"])
        per_device, world = self.args.per_device_train_batch_size, self.strategy.world_size
        if progress.get("per_device_train_batch_size") != per_device:
            raise CheckpointError(
                f"{path} was trained with per_device_train_batch_size={progress.get('per_device_train_batch_size')}, "
                f"this run uses {per_device}; keep it the same to resume"
            )
        saved_accumulation = progress.get("gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if manifest["world_size"] == world:
            if saved_accumulation != self.args.gradient_accumulation_steps:
                raise CheckpointError(
                    f"{path} was trained with gradient_accumulation_steps={saved_accumulation}, this run uses "
                    f"{self.args.gradient_accumulation_steps}; keep it the same to resume"
                )
            self.strategy.prepare_resume(world, saved_accumulation)
            return saved_accumulation
        global_batch = per_device * saved_accumulation * manifest["world_size"]
        if global_batch % (per_device * world):
            raise CheckpointError(
                f"{path} has a global batch of {global_batch} ({manifest['world_size']} ranks x {per_device} x "
                f"{saved_accumulation} accumulation); {world} ranks x {per_device} cannot make it up. Use a world "
                "size that divides it, or per_device_train_batch_size that does"
            )
        accumulation = global_batch // (per_device * world)
        if "samples_in_epoch" not in progress:
            raise CheckpointError(f"{path} does not record its data position in samples; it resumes on "
                                  f"{manifest['world_size']} ranks only")
        logger.warning("resuming a %d-rank checkpoint on %d ranks: gradient_accumulation_steps %d -> %d keeps the "
                       "global batch at %d; RNG streams start fresh", manifest["world_size"], world,
                       saved_accumulation, accumulation, global_batch)
        self.strategy.prepare_resume(manifest["world_size"], accumulation)
        return accumulation

    def _adopt_found_batch_size(self, path: Path, progress: dict, saved_world: int) -> None:
        """With auto_find_batch_size, a resume continues with the micro-batch the
        finder chose for the checkpointed run (no new search), if its global
        batch is the configured one."""
        args = self.args
        saved = (progress.get("per_device_train_batch_size"), progress.get("gradient_accumulation_steps"))
        if not args.auto_find_batch_size or None in saved or saved[0] == args.per_device_train_batch_size:
            return
        configured = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.strategy.world_size
        if saved[0] * saved[1] * saved_world != configured:
            raise CheckpointError(f"{path} has a global batch of {saved[0] * saved[1] * saved_world}; this run "
                                  f"is configured for {configured}. Keep the batch settings to resume")
        if saved_world == self.strategy.world_size:
            logger.info("resuming with the batch finder's earlier choice: micro-batch %d x %d accumulation", *saved)
            self.args = dataclasses.replace(args, per_device_train_batch_size=saved[0],
                                            gradient_accumulation_steps=saved[1])

    def _adapter_base(self) -> Optional[str]:
        """For an adapted (LoRA) model: where its frozen base weights come from."""
        peft_config = getattr(self.strategy.unwrap(self.model), "peft_config", None)
        return peft_config["default"].base_model_name_or_path if peft_config else None

    def _write_model_files(self, folder: Path) -> None:
        """Config and tokenizer beside the state, so `scaletrain export` needs nothing else.
        An adapted (LoRA) model adds its adapter config, which names the base
        model the frozen weights come from."""
        peft_config = getattr(self.strategy.unwrap(self.model), "peft_config", None)
        if peft_config:
            peft_config["default"].save_pretrained(str(folder))
        config = getattr(self.strategy.unwrap(self.model), "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(folder))
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(str(folder))

    def _resume(self, path: Path, max_steps: int) -> tuple[int, int]:
        manifest = self.checkpoints.read_manifest(path)
        check_same_model(path, manifest, self._model_fingerprint())
        _, progress = self.checkpoints.load(path, self.model_wrapped, self.optimizer, self.lr_scheduler)
        self.middleware.load_state_dict(progress.get("middleware", {}))  # e.g. the fp16 loss scale
        self._skipped_steps = int(progress.get("skipped_steps", 0))
        self._resumed_stream_state = progress.get("stream_state")
        if manifest["world_size"] != self.strategy.world_size:
            # the same global samples are consumed; this rank's share of them differs
            progress["micro_batches_in_epoch"] = int(progress["samples_in_epoch"]) // (
                self.args.per_device_train_batch_size * self.strategy.world_size)
        self.state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        self.state.max_steps = max_steps
        self.state.is_local_process_zero = self.strategy.is_local_main
        self.state.is_world_process_zero = self.strategy.is_main
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", path, self.state.global_step,
                    progress["epoch"], progress["micro_batches_in_epoch"])
        return int(progress["epoch"]), int(progress["micro_batches_in_epoch"])

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> Path:
        """Write a plain HF folder (config + safetensors + tokenizer) on the main rank."""
        out = Path(output_dir or self.args.output_dir)
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        state_dict = self.strategy.full_model_state_dict(model)
        if self.strategy.is_main:
            out.mkdir(parents=True, exist_ok=True)
            unwrapped = self.strategy.unwrap(model)
            state_dict = _without_tied_copies(unwrapped, state_dict)
            if hasattr(unwrapped, "save_pretrained"):
                unwrapped.save_pretrained(str(out), state_dict=state_dict)
            else:
                from safetensors.torch import save_model as save_safetensors

                save_safetensors(unwrapped, str(out / "model.safetensors"))
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(str(out))
            (out / "training_args.json").write_text(self.args.to_json_string())
        self.strategy.barrier()
        return out

    # ------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset: Optional[Union[Dataset, dict, str]] = None,
                 ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        loader = self.get_eval_dataloader(eval_dataset)
        start = time.perf_counter()
        loss_only = True if self.compute_metrics is None else None
        output = self.evaluation_loop(loader, "Evaluation", prediction_loss_only=loss_only, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        runtime = time.perf_counter() - start
        output.metrics.update({
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(output.num_samples / runtime, 3) if runtime > 0 else 0.0,
        })
        self.log(output.metrics)
        self.callback_handler.eval_dataloader = loader
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset: Dataset, ignore_keys: Optional[list[str]] = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        loader = self.get_test_dataloader(test_dataset)
        start = time.perf_counter()
        output = self.evaluation_loop(loader, "Prediction", ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        runtime = time.perf_counter() - start
        output.metrics[f"{metric_key_prefix}_runtime"] = round(runtime, 4)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None):
        """(loss, logits, labels) for one batch, as the HF Trainer returns them."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            ignore_keys = _default_ignore_keys(self.strategy.unwrap(self.model))
        labels = None
        if has_labels:
            labels = nested_detach(tuple(inputs[k] for k in self.label_names))
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad(), self.compute_loss_context_manager():
            if has_labels:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach().mean()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        if isinstance(outputs, dict):
            logits = tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"] and _is_tensor_tree(v))
        else:
            logits = tuple(v for v in (outputs[1:] if has_labels else outputs) if _is_tensor_tree(v))
        logits = nested_detach(logits)
        if isinstance(logits, (tuple, list)) and len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels

    def evaluation_loop(self, dataloader: DataLoader, description: str, prediction_loss_only: Optional[bool] = None,
                        ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Each rank evaluates its contiguous shard; results are gathered in
        dataset order, every sample exactly once."""
        args = self.args
        prediction_loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        if self.model_wrapped is None and self.strategy.eval_needs_all_ranks:
            # evaluate/predict before (or without) train(): a sharding backend
            # must still shard the model, or every rank would need all of it
            self._setup_model()
        model = self.strategy.eval_model(self.model_wrapped if self.model_wrapped is not None else self.model)
        model.eval()
        losses, preds, labels = [], [], []
        num_samples = 0
        # sharded forwards are collectives: agree on the longest shard before the first one
        rounds = self._eval_rounds(dataloader) if self.strategy.eval_needs_all_ranks else None
        local_batches = 0
        for inputs in dataloader:
            local_batches += 1
            bs = _batch_size(inputs)
            num_samples += bs
            items = self._count_loss_items(inputs)  # one sync per batch: evaluation reads its loss anyway
            loss, logits, batch_labels = self.prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if loss is not None:
                # (loss x targets, targets): the mean over all targets does not
                # depend on how rows fell into batches or ranks
                weight = int(items) if items is not None else bs
                losses.append(np.array([[loss.item() * weight, weight]], dtype=np.float64))
            if logits is not None:
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, batch_labels)
                preds.append(nested_numpify(logits))
            if batch_labels is not None:
                labels.append(nested_numpify(batch_labels))
            self.control = self.callback_handler.on_prediction_step(args, self.state, self.control)
        if rounds is not None and rounds > local_batches:
            # this rank's shard ran out: keep joining the others' forwards (and
            # their parameter all-gathers) with a filler batch, results discarded
            filler = dataloader.collate_fn([dataloader.dataset[0]])
            for _ in range(rounds - local_batches):
                self.prediction_step(model, filler, prediction_loss_only, ignore_keys)

        local = (num_samples, _concat(losses), _concat(preds), _concat(labels))
        gathered = self.strategy.all_gather_object(local)
        num_samples = sum(g[0] for g in gathered)
        losses, preds, labels = (_concat([g[i] for g in gathered]) for i in (1, 2, 3))

        metrics: dict[str, Any] = {}
        if self.compute_metrics is not None and preds is not None and labels is not None:
            computed = None
            if self.strategy.is_main:
                computed = self.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels))
            metrics = dict(self.strategy.broadcast_object(computed))  # one call, identical on every rank
        metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        if losses is not None:
            metrics["loss"] = float(losses[:, 0].sum() / max(losses[:, 1].sum(), 1.0))
        prefix = f"{metric_key_prefix}_"
        metrics = {(k if k.startswith(prefix) else prefix + k): v for k, v in metrics.items()}
        return EvalLoopOutput(predictions=preds, label_ids=labels, metrics=metrics, num_samples=num_samples)

    def _eval_rounds(self, dataloader: DataLoader) -> int:
        """The most evaluation batches any rank has."""
        return int(self.strategy.all_reduce_max(
            torch.tensor([len(dataloader)], dtype=torch.int64, device=self.strategy.device)).item())


def _apply_use_cache(model: torch.nn.Module, use_cache: bool) -> None:
    """As the HF Trainer does: no KV cache in training and evaluation forwards
    unless TrainingArguments.use_cache asks for one (generate keeps its own setting)."""
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = use_cache


def _default_ignore_keys(model: torch.nn.Module) -> list[str]:
    """The HF Trainer's default: the config's keys_to_ignore_at_inference, else ["cache"]."""
    config = getattr(_library_model(model), "config", None)
    if config is None:
        return []
    return list(getattr(config, "keys_to_ignore_at_inference", ["cache"]) or [])


def _is_tensor_tree(value: Any) -> bool:
    """A tensor, or tuples/lists of them: what can be gathered as predictions
    (a KV cache object, or None, cannot)."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(_is_tensor_tree(v) for v in value)


def _library_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft adapter wrapper (itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _model_class_name(model: torch.nn.Module) -> str:
    """The library class of a model whose class a backend may have wrapped (FSDP2 subclasses it)."""
    for cls in type(_library_model(model)).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def _without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of a tied parameter (e.g. lm_head.weight tied to the
    input embedding). A gathered state dict holds separate tensors for both, so
    save_pretrained cannot see the tie; the saved folder must match an unsharded save."""
    tied = tied_copy_names(model)
    return {name: tensor for name, tensor in state_dict.items() if name not in tied}


def tied_copy_names(model: torch.nn.Module) -> set[str]:
    """Every name of a shared parameter after its first (named_parameters order)."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}


def _longest_row(dataset) -> Any:
    """The training example with the longest sequence (the batch finder's
    worst case); iterable datasets are scanned over their first 10,000 rows."""
    def length(row) -> int:
        values = row.values() if hasattr(row, "values") else [row]
        return max((len(v) for v in values if hasattr(v, "__len__") and not isinstance(v, str)), default=0)

    if isinstance(dataset, (IterableDataset, ShardedIterable)):
        import itertools

        rows = itertools.islice(iter(dataset), 10_000)
    else:
        rows = (dataset[i] for i in range(len(dataset)))
    best, best_len = None, -1
    for row in rows:
        n = length(row)
        if n > best_len:
            best, best_len = row, n
    if best is None:
        raise ValueError("auto_find_batch_size needs a non-empty training dataset")
    return best


def _iter_keeping_rng(loader: DataLoader):
    """The loader's iterator, created without drawing from the global RNG.
    torch's DataLoader draws a base seed from it whenever an iterator is made;
    a resumed run makes its epoch's iterator after the checkpoint's RNG state
    is restored, so that draw would shift every later dropout mask against the
    uninterrupted run."""
    state = capture_rng_state()
    batches = iter(loader)
    restore_rng_state(state)
    return batches


def _concat(parts: list[Any]) -> Any:
    """Concatenate along the batch axis, padding ragged sequence axes with -100."""
    out = None
    for part in parts:
        if part is not None:
            out = part if out is None else nested_concat(out, part, padding_index=IGNORE_INDEX)
    return out


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return 0


def _token_count(batch: Any) -> Union[int, torch.Tensor]:
    """Non-padding input tokens (attention mask if present), without waiting for the device."""
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if isinstance(mask, torch.Tensor):
        return mask.sum()
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
