"""The Trainer facade: the Hugging Face Trainer's constructor, methods and overridable hooks.

It composes the parts and never names a backend: everything that differs
between single-device, DDP and the sharded backends is a Strategy method.
The run plan (plan.py) owns batch geometry, the loop (loop.py) the order of
events, the step runner (step.py) one optimizer step, resume.py every check
of a checkpoint, evaluation.py sharded evaluation.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import save_model as save_safetensors
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import DataCollatorWithPadding, default_data_collator
from transformers.trainer_callback import (
    CallbackHandler, DefaultFlowCallback, ExportableState, PrinterCallback, TrainerControl, TrainerState,
)
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import (
    EvalPrediction, SaveStrategy, TrainOutput, compare_trainer_and_checkpoint_args, enable_full_determinism, set_seed,
    speed_metrics,
)
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer import Trainer as HFTrainer
from transformers.utils import find_labels
from transformers.utils import logging as hf_logging

from ..args.training import NotSupportedError, TrainingArguments
from ..callbacks import ProgressCallback
from ..callbacks.reporters import reporter_callbacks
from ..checkpoint import CheckpointManager, resolve_resume_target
from ..checkpoint.manager import PREFIX as CHECKPOINT_PREFIX
from ..data.loaders import build_eval_dataloader, build_train_dataloader, prepare_dataset, signature_columns
from ..data.loaders import training_lengths
from ..data.position import stream_state
from ..parallel.environment import configure_threads
from ..parallel.sequence_parallel import split_rows
from ..performance.memory import PeakMemory, optimizer_state_bytes_to_come
from ..middleware import build_middleware
from ..middleware.batch_finder import BatchSizeChoice
from ..modeling import apply_use_cache, library_model, without_tied_copies
from ..strategies import Strategy, build_strategy
from ..optimizers import factory as optim
from .accelerator_view import AcceleratorView
from .batch_size import find_batch_size, longest_row
from .checkpoint_states import ProgressFile, hf_weights_writer, manifest_extra, model_files_writer, training_states
from .evaluation import BestMetric
from .evaluation_methods import EvaluationMethods
from .loop import TrainLoop
from .metrics import InputTokensSeen, MemoryMetrics
from .plan import BatchGeometry, RunPlan, build_run_plan
from .preemption import PreemptionWatch, jit_callbacks
from .progress import TrainProgress
from .reporting import ReportingMethods
from .search_trials import SearchTrialMethods
from .resume import ResumePoint, read_resume_point
from .step import LossWeighting, StepRunner, sequence_splitter

logger = logging.getLogger(__name__)


class Trainer(EvaluationMethods, SearchTrialMethods, ReportingMethods):
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
        args = _checked_args(args, compute_loss_func, optimizers, optimizer_cls_and_kwargs)
        if tokenizer is not None:
            warnings.warn("`tokenizer` is deprecated; pass `processing_class`", FutureWarning, stacklevel=2)
            processing_class = processing_class if processing_class is not None else tokenizer
        self.model_init = model_init
        self.processing_class = processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.data_collator = data_collator if data_collator is not None else _default_collator(processing_class)
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        # HF's hyperparameter-search attributes; search/ sets them while a search runs
        self.hp_search_backend, self.hp_space, self.hp_name, self.compute_objective = None, None, None, None
        self.objective: Any = None  # the last evaluation's objective during a search trial
        self._trial, self._search = None, None
        self.is_in_train = False  # HF's flag: bf16/fp16_full_eval cast the model only outside training
        self.search_study = None  # rank 0: the optuna Study of the last hyperparameter_search
        self._bind_args(args, strategy, memory_stage="init")
        self.model = self._initial_model(model, model_init)
        self.compute_metrics = _checked_metrics(compute_metrics, self.args.batch_eval_metrics)
        self.label_names = self.args.label_names if self.args.label_names is not None \
            else find_labels(type(self.model))
        self._bind_step_helpers(getattr(self.model, "main_input_name", "input_ids"))
        self.callback_handler = CallbackHandler(
            self._default_callbacks() + list(callbacks or []), self.model, processing_class, self.optimizer,
            self.lr_scheduler,
        )
        self.control = TrainerControl()
        self.state = self._new_state()
        self.fire("on_init_end")
        self.memory_metrics.end("init")

    def _bind_args(self, args: TrainingArguments, strategy: Optional[Strategy] = None,
                   memory_stage: Optional[str] = None) -> None:
        """Everything built from the arguments: the strategy (with its process group), middleware,
        checkpoint manager, loss and metric helpers. Construction calls it once; a hyperparameter
        search calls it again with each trial's arguments (and a strategy built from them)."""
        self.memory_metrics = MemoryMetrics(args.skip_memory_metrics)
        if memory_stage is not None:
            self.memory_metrics.begin(memory_stage)
        self.strategy = strategy if strategy is not None else build_strategy(args)
        self.args = args  # final: the launcher's requests were applied when they were made
        self.strategy.setup_environment()
        custom_loss = type(self).compute_loss is not Trainer.compute_loss
        _refuse_overrides_the_layout_bypasses(type(self), self.strategy.layout)
        self.middleware = build_middleware(args, self.strategy, custom_loss=custom_loss)
        self.num_threads = configure_threads(self.strategy.env, args.torch_threads)
        # as the HF Trainer does: log_level on the main process, log_level_replica on the others
        # ('passive' leaves the levels as they are); scaletrain's own loggers follow too
        hf_logging.set_verbosity(args.get_process_log_level())
        if (args.log_level if args.should_log else args.log_level_replica) != "passive":
            logging.getLogger("scaletrain").setLevel(args.get_process_log_level())
        _seed(args)
        self.model_wrapped: Optional[torch.nn.Module] = None
        self.checkpoints = CheckpointManager(args.output_dir, self.strategy)
        self.current_flos = 0.0  # since the last store_flos()
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # of the step running
        self.best_metric = BestMetric(args.metric_for_best_model, args.greater_is_better)
        self.label_smoother = LabelSmoother(args.label_smoothing_factor) if args.label_smoothing_factor else None
        self.plan: Optional[RunPlan] = None  # set by train()
        self.progress: Optional[TrainProgress] = None
        self.train_loader: Optional[DataLoader] = None
        self.batch_size_choice: Optional[BatchSizeChoice] = None
        self._train_batch_size = args.per_device_train_batch_size  # HF's name; the plan may change it
        self._longest_example = None  # (row, collator), for the batch finder's probes

    def _bind_step_helpers(self, main_input_name: str) -> None:
        """The loss weighting and token counting, which reduce over the strategy's ranks."""
        self.loss_weighting = LossWeighting(self.strategy, self.label_names, lambda: self.model)
        self.input_tokens = InputTokensSeen(self.args.include_num_input_tokens_seen, self.strategy, main_input_name,
                                            getattr(self.processing_class, "pad_token_id", None))

    def _initial_model(self, model, model_init, trial=None) -> torch.nn.Module:
        if model is not None and model_init is not None:
            raise ValueError("pass either model or model_init, not both")
        if model is None:
            if model_init is None:
                raise ValueError("Trainer needs a model or a model_init")
            model = self.call_model_init(trial)
        apply_use_cache(model, self.args.use_cache)
        return model

    def _default_callbacks(self) -> list:
        """HF's default list: the flow, the report_to integrations, then the progress bar (HF's
        PrinterCallback with disable_tqdm)."""
        progress = PrinterCallback() if self.args.disable_tqdm else ProgressCallback()
        return [DefaultFlowCallback, *reporter_callbacks(self.args.report_to), progress, *jit_callbacks(self)]

    def _new_state(self, plan: Optional[RunPlan] = None) -> TrainerState:
        state = TrainerState(is_local_process_zero=self.strategy.is_local_main,
                             is_world_process_zero=self.strategy.is_main,
                             stateful_callbacks=self._exportable_callbacks())
        if plan is not None:
            state.max_steps, state.num_train_epochs = plan.max_steps, plan.num_epochs
            state.train_batch_size = plan.per_device
            state.logging_steps, state.save_steps, state.eval_steps = (plan.logging_steps, plan.save_steps,
                                                                        plan.eval_steps)
        return state

    def _exportable_callbacks(self) -> list:
        """What HF saves in trainer_state.json's stateful_callbacks: TrainerControl and the callbacks
        with a state (EarlyStoppingCallback's patience counter)."""
        return [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]

    def fire(self, event: str, **kwargs) -> None:
        """Run a TrainerCallback event on every callback; they steer through `control`."""
        self.control = getattr(self.callback_handler, event)(self.args, self.state, self.control, **kwargs)

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

    # ------------------------------------------------------------- dataloaders
    def _columns(self) -> Optional[list[str]]:
        if not self.args.remove_unused_columns:
            return None
        return signature_columns(library_model(self.strategy.unwrap(self.model)), self.label_names)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs a train_dataset")
        dataset, collator = prepare_dataset(self.train_dataset, self.data_collator, self._columns(), "training")
        lengths = None
        if self.args.train_sampling_strategy == "group_by_length" and not isinstance(dataset, IterableDataset):
            input_names = getattr(self.processing_class, "model_input_names", None)
            lengths = training_lengths(self.train_dataset, dataset, self.args, input_names[0] if input_names else None)
        layout = self.strategy.layout
        return build_train_dataloader(dataset, collator, self.args, layout.dp_rank, layout.dp_size,
                                      self.strategy.device, batch_size=self._train_batch_size, lengths=lengths)

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
        layout = self.strategy.layout
        return build_eval_dataloader(dataset, collator, self.args, layout.dp_rank, layout.dp_size,
                                     self.strategy.device)

    # ------------------------------------------------------ optimizer / sched
    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return optim.decay_parameter_names(model)

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.strategy.unwrap(self.model)
            groups = optim.parameter_groups(model, self.get_decay_parameter_names(model), self.args.weight_decay)
            self.optimizer = optim.build_optimizer(model, groups, self.args, self.optimizer_cls_and_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = optim.build_scheduler(self.args, optimizer, num_training_steps)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps, self.optimizer)

    # ------------------------------------------------------------------- loss
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[int, torch.Tensor]] = None):
        """The model's loss. With `num_items_in_batch` (the targets of the whole step, over all
        micro-batches and ranks) it is normalised as HF's is: this micro-batch's summed loss over
        num_items_in_batch, times the world size that DDP's gradient averaging divides by; the
        sum comes from the model's mean and the micro-batch's own target count, so models that
        take no loss kwargs are exact too. An override that returns sum / num_items_in_batch
        (HF's idiom) is used as it is."""
        if self.label_smoother is not None and "labels" in inputs:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = self.label_smoother(outputs, inputs["labels"], shift_labels=bool(self.loss_weighting.label_shift))
        else:
            outputs = model(**inputs)
            loss = self._model_loss(outputs)
        if num_items_in_batch is not None:
            loss = loss * self.loss_weighting.weight(inputs, num_items_in_batch).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _model_loss(self, outputs) -> torch.Tensor:
        if isinstance(outputs, dict):
            if "loss" not in outputs or outputs["loss"] is None:
                raise ValueError(
                    f"the model returned no loss (keys: {sorted(outputs.keys())}); the batch needs labels "
                    f"({self.label_names}) or override Trainer.compute_loss"
                )
            return outputs["loss"]
        return outputs[0]

    @contextlib.contextmanager
    def compute_loss_context_manager(self):
        """Around every forward: the strategy's precision (autocast where the backend does not cast)
        inside the middleware's contexts."""
        with self.middleware.forward_context(), self.strategy.forward_context():
            yield

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = self.strategy.device
        if device.type == "cpu":
            return inputs
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """Forward + backward of one micro-batch (HF's signature); returns its loss as scaled for the
        step, detached. Without countable targets, micro-batch means are averaged (as HF does)."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:
            loss = loss / self.current_gradient_accumulation_steps
        self.strategy.backward(loss)
        return loss.detach()

    @property
    def accelerator(self) -> AcceleratorView:
        """For overrides written against HF's Trainer (`self.accelerator.backward(loss)`, ...)."""
        return AcceleratorView(self.strategy)

    # ------------------------------------------------------------------ train
    def call_model_init(self, trial=None) -> torch.nn.Module:
        n_args = len(inspect.signature(self.model_init).parameters)
        model = self.model_init(trial) if n_args == 1 else self.model_init()
        if model is None:
            raise ValueError("model_init returned None")
        return model

    def _setup_model(self) -> None:
        """Middleware first (activation checkpointing, adapters), then the strategy
        wraps/shards the model and builds its optimizer."""
        self.middleware.configure_strategy(self.strategy)
        self.model = model = self.middleware.transform_model(self.model, self.strategy)
        user_optimizer = self.optimizer
        self.model_wrapped, self.optimizer = self.strategy.setup(
            model, lambda module: user_optimizer if user_optimizer is not None else self.create_optimizer(module))

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None,
              ignore_keys_for_eval: Optional[list[str]] = None, **kwargs) -> TrainOutput:
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        self.memory_metrics.begin("train")
        resume_path = resolve_resume_target(resume_from_checkpoint, self.args.output_dir)
        if self.model_init is not None:
            _seed(self.args)
            self.model = self._initial_model(None, self.model_init, trial)
            self.optimizer, self.lr_scheduler = None, None
        geometry = BatchGeometry.configured(self.args, self.strategy.layout.dp_size)
        point = None
        if resume_path is not None:
            point = read_resume_point(resume_path, self.checkpoints, self.strategy, geometry,
                                      self.args.auto_find_batch_size)
            geometry = point.geometry
        plan = self._plan(geometry)
        self._setup_model()
        if self.args.auto_find_batch_size and point is None:
            self.batch_size_choice, geometry = find_batch_size(self.measure_step_memory, self.args, geometry,
                                                               self.strategy.device, self.strategy.env.local_world_size)
            plan = self._plan(geometry)
        self.create_scheduler(plan.max_steps, self.optimizer)
        self.state, self.progress = self._new_state(plan), TrainProgress(plan.geometry)
        if point is not None:
            self._restore(point, plan)
        self.input_tokens.session_start = self.state.num_input_tokens_seen
        if self.strategy.writes_files:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        handler = self.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = self.model, self.optimizer, self.lr_scheduler
        handler.train_dataloader = self.train_loader
        logger.info("training with %s, %d threads/rank, %d steps (%s)", self.strategy.describe(), self.num_threads,
                    plan.max_steps, plan.geometry.describe())
        self._log_hf_run_start(plan)
        runner = StepRunner(self, self.loss_weighting, self.args.max_grad_norm)
        self.is_in_train = True
        try:
            with PreemptionWatch(self.strategy, _watched_signals(self.args), self.args.preemption_grace_period,
                                 exits=not self.args.enable_jit_checkpoint) as watch:
                return TrainLoop(self, plan, self.progress, runner, ignore_keys_for_eval, watch).run()
        finally:
            self.is_in_train = False

    def _plan(self, geometry: BatchGeometry) -> RunPlan:
        """The run plan for `geometry`, with the training loader built for it."""
        self._train_batch_size = geometry.per_device
        self.train_loader = loader = self.get_train_dataloader()
        try:
            per_epoch: Optional[int] = len(loader)
        except TypeError:
            per_epoch = None
        self.plan = build_run_plan(self.args, geometry, per_epoch, self.strategy.rank)
        return self.plan

    def _restore(self, point: ResumePoint, plan: RunPlan) -> None:
        point.check_model(manifest_extra(self.strategy.unwrap(self.model))["model_fingerprint"])
        progress = ProgressFile(self.progress, self.middleware, self.strategy.precision)
        states = training_states(self.state, None, self.lr_scheduler, with_scheduler=True)
        self.checkpoints.load(point.path, self.model_wrapped, self.optimizer, states, manifest=point.manifest)
        progress.load_state_dict(point.saved_progress(plan.updates_per_epoch))  # read once, with the checks
        self._load_callback_state()
        compare_trainer_and_checkpoint_args(self.args, self.state)  # HF's warning on changed step settings
        if self.args.ignore_data_skip:  # HF's meaning: the epoch's data from its start, no skipping
            self.progress.micro_batches_in_epoch, self.progress.stream_state = 0, None
        self.state.max_steps = plan.max_steps
        self.state.is_local_process_zero = self.strategy.is_local_main
        self.state.is_world_process_zero = self.strategy.is_main
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", point.path, self.state.global_step,
                    self.progress.epoch, self.progress.micro_batches_in_epoch)

    # ----------------------------------------------------------- batch finder
    def measure_step_memory(self, micro_batch: int) -> int:
        """Peak bytes per rank (the most over ranks; every rank must call this)
        of one training micro-step of `micro_batch` copies of the longest
        training example: the state held before it, plus what forward and
        backward allocate, plus optimizer state that is not allocated yet. The
        gradients are discarded; the model must be set up (train() does it)."""
        if self._longest_example is None:
            dataset, collator = prepare_dataset(self.train_dataset, self.data_collator, self._columns(), "training")
            self._longest_example = (longest_row(dataset), collator)
        row, collator = self._longest_example
        self.model_wrapped.train()
        # with sp: this rank's slice of the rows, as training runs
        batch, rows = sequence_splitter(self.strategy).split(collator([row] * micro_batch))
        batch = self._prepare_inputs(batch)
        with PeakMemory(self.strategy.device) as peak, split_rows(rows):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(self.model_wrapped, batch)
            self.strategy.backward(loss)
            del loss
        self.strategy.discard_gradients(self.model_wrapped, self.optimizer)
        held = peak.baseline if peak.baseline is not None else \
            self.strategy.held_state_numel(self.model_wrapped, self.optimizer)["bytes"]
        total = held + peak.peak + optimizer_state_bytes_to_come(self.optimizer)
        # every rank follows the worst rank's measurement, so all take the same path
        worst = torch.tensor([float(total)], dtype=torch.float64, device=self.strategy.device)
        return int(self.strategy.all_reduce_max(worst).item())

    # ----------------------------------------------------- logging and saving
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """As HF's: `logs` gains the epoch in place (evaluate() returns its metrics with it)."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.input_tokens.enabled:
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        if start_time is not None:
            session_tokens = self.state.num_input_tokens_seen - (self.input_tokens.session_start or 0)
            logs.update(speed_metrics("train", start_time, num_tokens=session_tokens if self.input_tokens.enabled
                                      else None))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.fire("on_log", logs=logs)

    # HF's own restore of stateful_callbacks (restore_callback_states_from_checkpoint), by HF's name
    _load_callback_state = HFTrainer._load_callback_state

    def _save_checkpoint(self, model=None, trial=None) -> Path:
        """HF's name for a checkpoint of the current step (its JIT checkpoint manager calls it)."""
        return self.save_checkpoint()

    def _get_output_dir(self, trial=None) -> str:
        """Where checkpoints go (a search trial runs with its own output_dir in its arguments)."""
        return self.args.output_dir

    def save_checkpoint(self) -> Path:
        step = self.state.global_step
        final = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}-{step}"
        if self.state.best_global_step == step:
            self.state.best_model_checkpoint = str(final)
        self.store_flos()  # into the saved trainer_state.json, as HF does
        self.state.stateful_callbacks.update(TrainerState(stateful_callbacks=self._exportable_callbacks())
                                             .stateful_callbacks)
        self.progress.stream_state = stream_state(self.train_loader, self.progress.micro_batches_in_epoch)
        progress = ProgressFile(self.progress, self.middleware, self.strategy.precision)
        unwrapped = self.strategy.unwrap(self.model)
        path = self.checkpoints.save(
            step, self.model_wrapped, self.optimizer,
            training_states(self.state, progress, self.lr_scheduler, with_scheduler=not self.args.save_only_model),
            manifest_extra(unwrapped), save_only_model=self.args.save_only_model,
            write_model_files=model_files_writer(unwrapped, self.processing_class, self.args),
            write_weights=hf_weights_writer(self.strategy, self.model_wrapped, unwrapped),
            asynchronous=self.args.save_async,
        )
        best = Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
        self.checkpoints.rotate(self.args.save_total_limit, keep={best} if best else set())
        self.strategy.barrier()
        return path

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> Path:
        """Write a plain HF folder (config + safetensors + tokenizer) on the main rank (each node's first
        with save_on_each_node)."""
        out = Path(output_dir or self.args.output_dir)
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        state_dict = self.strategy.full_model_state_dict(model)
        if self.strategy.writes_files:
            out.mkdir(parents=True, exist_ok=True)
            unwrapped = self.strategy.unwrap(model)
            state_dict = without_tied_copies(unwrapped, state_dict)
            if hasattr(unwrapped, "save_pretrained"):
                with _saving_on_this_rank(unwrapped):
                    unwrapped.save_pretrained(str(out), state_dict=state_dict)
            else:
                save_safetensors(unwrapped, str(out / "model.safetensors"))
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(str(out))
            torch.save(self.args, out / TRAINING_ARGS_NAME)  # as the HF Trainer writes it
            (out / "training_args.json").write_text(self.args.to_json_string())  # and readable without unpickling
        self.strategy.barrier()
        return out


@contextlib.contextmanager
def _saving_on_this_rank(model: torch.nn.Module):
    """transformers 5's save_pretrained writes nothing on a rank other than 0 once a process group exists;
    with save_on_each_node the other nodes' first ranks must write too (this process decided it writes)."""
    if not hasattr(model, "should_save_on_this_rank"):
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank


def _refuse_overrides_the_layout_bypasses(cls: type, layout) -> None:
    """sp gives compute_loss slices of rows; pp runs stages whose last one computes the model's own loss, so
    none of compute_loss, training_step and prediction_step would run as written. A class may name overrides
    that call the Trainer's own where these layouts run (`layout_safe_overrides`: Seq2SeqTrainer's
    prediction_step does without generation, which pp refuses)."""
    def replaced(name: str) -> bool:
        if getattr(cls, name) is getattr(Trainer, name):
            return False
        owner = next(k for k in cls.__mro__ if name in vars(k))
        return name not in vars(owner).get("layout_safe_overrides", ())

    overridden = [name for name in ("compute_loss", "training_step", "prediction_step") if replaced(name)]
    if "compute_loss" in overridden and layout.sp > 1:
        raise NotSupportedError(f"{cls.__name__} overrides compute_loss, and parallelism_config sp_size={layout.sp} "
                                "gives each rank one slice of every row (with shift_labels): the override would see "
                                "slices; train without sp_size")
    if overridden and layout.pp > 1:
        raise NotSupportedError(f"{cls.__name__} overrides {overridden[0]}, and parallelism_config pp_size={layout.pp} "
                                "runs the model in pipeline stages whose last one computes the model's own loss: the "
                                "override would not run as written; train without pp_size")


def _checked_args(args, compute_loss_func, optimizers, optimizer_cls_and_kwargs) -> TrainingArguments:
    if args is None:
        args = TrainingArguments(output_dir="trainer_output")
    if not hasattr(args, "strategy"):
        raise TypeError(
            f"args is a {type(args).__module__}.{type(args).__name__}; pass scaletrain.TrainingArguments "
            "(same field names) so every option is either honoured or refused"
        )
    if compute_loss_func is not None:
        raise NotSupportedError(
            "compute_loss_func is not supported yet by scaletrain; override Trainer.compute_loss and return "
            "the micro-batch mean loss (the trainer normalises by the global token count itself)"
        )
    if optimizer_cls_and_kwargs is not None and optimizers[0] is not None:
        raise ValueError("pass either optimizers or optimizer_cls_and_kwargs, not both")
    if args.save_strategy == SaveStrategy.BEST and args.metric_for_best_model is None:
        # where HF checks it (the Trainer, not the arguments), so arguments made first stay valid
        raise ValueError("`args.metric_for_best_model` must be provided when using 'best' save_strategy "
                         "(e.g. 'eval_loss', or a metric compute_metrics returns)")
    return args


def _checked_metrics(compute_metrics: Optional[Callable], batch_eval_metrics: bool) -> Optional[Callable]:
    if batch_eval_metrics and compute_metrics is not None \
            and "compute_result" not in inspect.signature(compute_metrics).parameters:
        raise ValueError("batch_eval_metrics=True calls compute_metrics(eval_pred, compute_result=...) after every "
                         "batch: add a `compute_result` argument (True on the last batch: return the metrics then)")
    return compute_metrics


def _watched_signals(args) -> list[str]:
    """preemption_signals, plus SIGTERM with HF's enable_jit_checkpoint (which asks for it by name)."""
    signals = list(args.preemption_signals)
    return signals + ["SIGTERM"] if args.enable_jit_checkpoint and "SIGTERM" not in signals else signals


def _seed(args) -> None:
    """As the HF Trainer seeds: deterministic kernels too with full_determinism."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def _default_collator(processing_class) -> Callable:
    if processing_class is not None and hasattr(processing_class, "pad"):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator
