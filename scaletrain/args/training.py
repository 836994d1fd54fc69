"""TrainingArguments with the Hugging Face names, validated before any process starts.

Every field of `transformers.TrainingArguments` is accepted by name, so an HF
script or YAML ports by changing its import. Fields scaletrain implements are
declared below; every other HF field is added automatically and must keep its
HF default: a value that would be silently ignored is an error instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import transformers
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from .hf_sharding import apply_hf_sharding_fields
from .json_options import read_json_option
from .launcher import apply_launcher_settings
from .process import ProcessFacts
from ..errors import NotSupportedError
from ..callbacks.reporters import check_reporters, installed_reporters
from ..optimizers.catalog import (SCHEDULE_FREE_OPTIMIZERS, check_optim_args, check_optimizer_for_strategy,
                                  check_optimizer_name, check_target_modules)
from ..middleware import check_middleware_options
from ..parallel.config import parallelism_settings
from ..parallel.environment import launcher_settings
from ..strategies.options import check_strategy_options

STRATEGIES = ("auto", "single", "ddp", "fsdp", "zero1", "zero2", "zero3")
_TOKEN_FIELDS = ("hub_token",)


@dataclass
class _ScaletrainArguments(ProcessFacts):
    output_dir: Optional[str] = None
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: Optional[str] = None

    # Batching and optimisation.
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    optim_args: Optional[str] = None  # "key=value,..." as HF reads it per optimizer (optimizers.py checks the keys)
    optim_target_modules: Union[None, str, list] = None  # GaLore/APOLLO: the modules whose gradients are projected
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: Optional[dict] = None
    warmup_steps: float = 0
    warmup_ratio: Optional[float] = None

    # Logging, evaluation, saving.
    logging_strategy: str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    logging_nan_inf_filter: bool = True
    eval_strategy: str = "no"
    evaluation_strategy: Optional[str] = None  # deprecated HF alias of eval_strategy
    eval_steps: Optional[float] = None
    eval_delay: float = 0
    eval_on_start: bool = False
    prediction_loss_only: bool = False
    # HF's: compute_metrics also gets the main inputs and/or per-sample losses ("inputs", "loss")
    include_for_metrics: list[str] = field(default_factory=list)
    # HF's: compute_metrics(EvalPrediction(batch), compute_result=is_last) after every batch, no predictions kept
    batch_eval_metrics: bool = False
    # HF's: False gives compute_metrics and predict() lists of per-batch arrays
    eval_do_concat_batches: bool = True
    # HF's: move predictions to host memory every N eval batches; scaletrain moves them after every
    # batch, so any N is honoured (the device never holds more than one batch of them)
    eval_accumulation_steps: Optional[int] = None
    # HF's: gather evaluation outputs as Python objects (nested lists, strings, ragged arrays) rather than
    # padded tensors; scaletrain gathers every rank's outputs with all_gather_object in dataset order
    # either way, so both values give the same, complete result
    eval_use_gather_object: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    save_only_model: bool = False
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    report_to: Union[None, str, list[str]] = "none"
    run_name: Optional[str] = None
    project: str = "huggingface"
    disable_tqdm: Optional[bool] = None
    log_level: str = "passive"
    log_level_replica: str = "warning"
    log_on_each_node: bool = True

    # Set on model.config at Trainer construction, as the HF Trainer does: training
    # and evaluation forwards build no KV cache unless asked (generate keeps its own)
    use_cache: bool = False
    # HF's label smoothing of the cross-entropy over the model's logits (its LabelSmoother)
    label_smoothing_factor: float = 0.0
    # NEFTune noise on the input embeddings while training (middleware/neftune.py)
    neftune_noise_alpha: Optional[float] = None
    # torch.compile (middleware/compilation.py): whole model, or per block under fsdp
    torch_compile: bool = False
    torch_compile_backend: Optional[str] = None
    torch_compile_mode: Optional[str] = None
    # causal LMs: the loss applies the LM head chunk by chunk and never holds all the logits
    # (middleware/chunked_loss.py): "auto" (where the logits would be the largest activation), "true" or "false";
    # typed str so HfArgumentParser reads "auto" (it would parse a Union[str, bool] as a bool), bools accepted too
    chunked_loss: str = "auto"
    chunked_loss_tokens: int = 1024  # target positions per chunk
    # float8 training (middleware/float8.py, torchao): the Linear layers' matmuls in float8 with dynamic
    # tensor-wise scales (not the LM head; sizes multiples of 16); under fsdp the weights are all-gathered in float8
    float8: bool = False
    use_liger_kernel: bool = False  # Liger's Triton kernels patched into the model (CUDA only)
    liger_kernel_config: Optional[dict] = None
    # HF's: deterministic torch kernels (and CUDA env settings) instead of a plain seed
    full_determinism: bool = False
    # HF's: TF32 matmuls on Ampere+ GPUs (True, False, or None to leave torch's setting)
    tf32: Optional[bool] = None
    # HF's: count the input tokens trained on ("all", "non_padding", or "no"; True/False as HF spells them)
    # into state.num_input_tokens_seen and every log
    include_num_input_tokens_seen: Union[str, bool] = "no"
    # HF's: empty the accelerator's cache after every N-th optimizer step (slower; lower peak reserved memory)
    torch_empty_cache_steps: Optional[int] = None
    # HF's: False adds *_mem_cpu_* (and *_mem_gpu_*) deltas to the init/train/eval/test metrics
    skip_memory_metrics: bool = True

    # Reproducibility and data.
    seed: int = 42
    data_seed: Optional[int] = None
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: Optional[int] = None
    remove_unused_columns: bool = True
    label_names: Optional[list[str]] = None
    ignore_data_skip: bool = False
    # HF's: a resume also restores the checkpoint's stateful callbacks (EarlyStoppingCallback's
    # patience counter) and TrainerControl, from trainer_state.json's stateful_callbacks
    restore_callback_states_from_checkpoint: bool = False
    # HF's: the training order, "random", "sequential" or "group_by_length" (rows of similar length
    # batched together, lengths from length_column_name or the main input); all resume exactly
    train_sampling_strategy: str = "random"
    length_column_name: str = "length"

    # Distributed.
    use_cpu: bool = False
    local_rank: int = -1  # old launchers pass --local_rank; the env is read instead
    ddp_backend: Optional[str] = None
    ddp_timeout: int = 1800
    ddp_find_unused_parameters: Optional[bool] = None
    ddp_bucket_cap_mb: Optional[int] = None
    ddp_gradient_as_bucket_view: bool = True  # ddp: gradients live in the all-reduce buckets (one copy)
    ddp_broadcast_buffers: Optional[bool] = None
    ddp_static_graph: Optional[bool] = None

    # HF's ways to ask for a sharded backend; mapped onto `strategy` and the
    # fields below (args/hf_sharding.py)
    fsdp: Union[None, str, list] = None
    fsdp_config: Union[None, str, dict] = None
    deepspeed: Union[None, str, dict] = None  # extra DeepSpeed config keys (dict or JSON file)
    # how the ranks divide the work (HF's field: accelerate's ParallelismConfig, or a dict / JSON with its keys):
    # dp_replicate_size x dp_shard_size (HSDP under fsdp; -1 = the rest of the ranks) x tp_size x sp_size (Ulysses)
    # x pp_size (pipeline stages: pp_schedule, pp_microbatches, pp_stages_per_rank, pp_split_points)
    parallelism_config: Union[None, str, dict] = None

    # scaletrain's own.
    strategy: str = "auto"
    # one device's peak TFLOP/s for the logged MFU; default: the dense bf16 peak of a known GPU (trainer/flops.py)
    peak_tflops: Optional[float] = None
    torch_threads: Optional[int] = None
    # fsdp: module classes sharded as one unit (default: the model's _no_split_modules)
    fsdp_layer_classes: Optional[list[str]] = None
    fsdp_reshard_after_forward: bool = True  # False: keep gathered params until backward (ZeRO-2-like)
    fsdp_cpu_offload: bool = False  # parameters, gradients and optimizer step on CPU
    # fsdp: only rank 0 reads the weights; the others build the model on the meta
    # device and receive their shards from rank 0 (via Strategy.build_model)
    fsdp_low_memory_init: bool = False
    fsdp_prefetch: Optional[int] = None  # fsdp: all-gather the next N blocks ahead (None: FSDP2's implicit one)
    offload_optimizer: bool = False  # zero1/2/3: optimizer state and step on CPU
    offload_params: bool = False  # zero3: parameters on CPU between uses
    # write checkpoints in the background (DCP strategies): training waits only
    # while the state is copied to host memory; the commit follows when all
    # ranks' bytes are on disk (at the next save or the end of training)
    save_async: bool = False
    save_on_each_node: bool = False  # nodes without a shared filesystem: each node's first process writes
    # preemption: on one of these signals every rank finishes its step, a checkpoint is committed at the
    # step reached and train() raises Preempted (exit code 75); a second signal, or the grace period
    # running out, exits at once (the last committed checkpoint stays the resume target). [] disables.
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preemption_grace_period: float = 30.0
    # HF's just-in-time checkpoint: on SIGTERM the checkpoint at the step reached is committed and training
    # stops, train() returning as after its last step (instead of raising Preempted). The ranks agree on the
    # step as above; saves are atomic, so HF's 3 s wait for a SIGKILL that may follow is not needed
    enable_jit_checkpoint: bool = False
    # a NaN/inf training loss: "stop" (every rank raises NonFiniteLossError at the next log or save, and no
    # checkpoint of the poisoned state is written), "skip" (the step is not taken and is counted in
    # skipped_steps; costs one host read per step), or "continue" (HF's behaviour, with a warning per log)
    nonfinite_loss: str = "stop"

    # Memory middleware (HF names first). Mixed precision: bf16 via autocast
    # (single/ddp), FSDP2's MixedPrecisionPolicy or DeepSpeed's bf16 block; fp16
    # adds dynamic loss scaling.
    bf16: bool = False
    fp16: bool = False
    bf16_full_eval: bool = False  # evaluate()/predict() outside training cast the model to bf16 (fp16), as HF
    fp16_full_eval: bool = False
    # activation checkpointing of every transformer block (non-reentrant);
    # activation_checkpointing_kwargs={"every_n_layers": k} checkpoints every k-th
    activation_checkpointing: Optional[bool] = None
    activation_checkpointing_kwargs: Union[None, str, dict] = None
    gradient_checkpointing: Optional[bool] = None  # deprecated HF alias of activation_checkpointing
    gradient_checkpointing_kwargs: Union[None, str, dict] = None  # deprecated HF alias
    # pre-flight search for the largest per-device micro-batch that fits the
    # memory budget, keeping the global batch by raising accumulation
    auto_find_batch_size: bool = False
    # per-device budget, e.g. "6GiB" or "800MiB"; default on GPU: 90% of the
    # device's memory; required on CPU (see scaletrain/performance/memory.py)
    batch_finder_memory_budget: Optional[str] = None
    # LoRA through peft, applied before the strategy wraps the model: keys r,
    # alpha, dropout, target_modules (a list or "all-linear"), modules_to_save, bias
    lora: Union[None, str, dict] = None
    # QLoRA: quantize the base's linear layers (bitsandbytes) before adding LoRA:
    # keys bits (4|8), quant_type (nf4|fp4), double_quant, compute_dtype, skip_modules
    quantization: Union[None, str, dict] = None

    def __post_init__(self) -> None:
        self._reject_unsupported_hf_fields()
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if self.evaluation_strategy is not None:
            warnings.warn(
                "`evaluation_strategy` is deprecated; use `eval_strategy` instead",
                FutureWarning,
                stacklevel=3,
            )
            self.eval_strategy = self.evaluation_strategy
            self.evaluation_strategy = None
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
            if self.warmup_steps:
                raise ValueError(
                    f"warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps} are both "
                    "set; keep one of them"
                )
        self._normalise_report_to()
        apply_launcher_settings(self, launcher_settings())
        self._apply_parallelism_config()
        apply_hf_sharding_fields(self)
        self._apply_checkpointing_aliases()
        self._validate()

    def _recheck(self) -> None:
        """After a set_* helper changed fields: the checks construction runs."""
        self._reject_unsupported_hf_fields()
        self._normalise_report_to()
        self._validate()

    def _normalise_report_to(self) -> None:
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        # HF's spellings: "none" (also as a one-item list, as JSON/YAML files write it) and "all"
        reports = [] if reports in ([], ["none"], [""]) else reports
        self.report_to = installed_reporters() if reports == ["all"] else reports

    # ------------------------------------------------------------------ checks
    def _apply_parallelism_config(self) -> None:
        value = self.parallelism_config
        if isinstance(value, str):
            value = read_json_option("parallelism_config", value)
        self.parallelism_config = config = parallelism_settings(value)
        if config is None:
            return
        config.check_supported()
        if self.strategy == "auto" and (config.dp_shard_size != 1 or config.sp_size > 1 or config.pp_size > 1):
            # sharding asked for: FSDP2 (with dp_replicate_size: HSDP); with sp it shards over the sp ranks too;
            # pipeline stages run under FSDP2 (its post-backward is what torch's stages call once per step)
            self.strategy = "fsdp"

    def _apply_checkpointing_aliases(self) -> None:
        """HF v5 renamed gradient_checkpointing* to activation_checkpointing*; both are accepted."""
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None:  # as in HF, the new name wins when both are set
                setattr(self, new, getattr(self, old))
        self.activation_checkpointing = bool(self.activation_checkpointing)
        self.gradient_checkpointing = self.activation_checkpointing
        if self.activation_checkpointing_kwargs is not None:
            kwargs = read_json_option("activation_checkpointing_kwargs", self.activation_checkpointing_kwargs)
            self.activation_checkpointing_kwargs = kwargs
            self.gradient_checkpointing_kwargs = kwargs

    def _reject_unsupported_hf_fields(self) -> None:
        for name, default in _UNSUPPORTED_DEFAULTS.items():
            value = getattr(self, name)
            if name in _HF_SPELLINGS and value in _HF_SPELLINGS[name]:
                value = _HF_SPELLINGS[name][value]
                setattr(self, name, value)
            if value != default:
                hint = _UNSUPPORTED_HINTS.get(name, f"leave it at its default {default!r}")
                raise NotSupportedError(
                    f"TrainingArguments.{name}={value!r} is not supported yet by scaletrain; {hint}"
                )

    def _validate(self) -> None:
        """The Trainer's own options here; each strategy and middleware checks its own
        (strategies/options.py, middleware/__init__.py), all before any process group starts."""
        self._validate_choices()
        self._validate_preemption()
        self._validate_lengths()
        self._validate_loading_and_reporting()
        for name in ("lora", "quantization", "liger_kernel_config"):
            if getattr(self, name) is not None:
                setattr(self, name, read_json_option(name, getattr(self, name)))
        check_strategy_options(self)
        check_optimizer_for_strategy(self.optim, self.strategy, self.device.type == "cuda")
        check_middleware_options(self)
        self._validate_best_model()

    def _validate_choices(self) -> None:
        def choice(name: str, options) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"{name}={value!r} is not one of {sorted(options)}")

        for name in ("logging_strategy", "eval_strategy"):
            choice(name, {s.value for s in IntervalStrategy})
            setattr(self, name, IntervalStrategy(getattr(self, name)))
        choice("save_strategy", {s.value for s in SaveStrategy})
        self.save_strategy = SaveStrategy(self.save_strategy)
        choice("strategy", STRATEGIES)
        check_optimizer_name(self.optim)
        self.optim = OptimizerNames(self.optim)
        check_optim_args(self.optim, self.optim_args)
        check_target_modules(self.optim, self.optim_target_modules)
        choice("lr_scheduler_type", {s.value for s in SchedulerType})
        self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)  # HF's type, which its model card reads
        choice("ddp_backend", {None, "gloo", "nccl"})
        if self.train_sampling_strategy == "batch_rebalance":
            raise NotSupportedError("train_sampling_strategy='batch_rebalance' is not supported yet by scaletrain; "
                                    "'group_by_length' batches rows of similar length together")
        choice("train_sampling_strategy", {"random", "sequential", "group_by_length"})
        choice("nonfinite_loss", {"stop", "skip", "continue"})
        tokens_seen = self.include_num_input_tokens_seen
        self.include_num_input_tokens_seen = {True: "all", False: "no"}.get(tokens_seen, tokens_seen)
        choice("include_num_input_tokens_seen", {"no", "all", "non_padding"})

    def _validate_preemption(self) -> None:
        unknown = [name for name in self.preemption_signals
                   if name not in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")]
        if unknown:
            raise ValueError(f"preemption_signals={self.preemption_signals}: {unknown} cannot be watched; use "
                             "SIGTERM, SIGUSR1, SIGUSR2, SIGINT or SIGHUP (SIGKILL cannot be caught)")
        if not self.preemption_grace_period > 0:
            raise ValueError(f"preemption_grace_period={self.preemption_grace_period} must be > 0 seconds")

    def _validate_lengths(self) -> None:
        for name, bound, meaning in _LOWER_BOUNDS:
            value = getattr(self, name)
            if value is not None and value < bound:
                raise ValueError(f"{name}={value} must be {meaning}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps} must be a positive number of steps or -1 (use epochs)")
        if self.max_steps < 0 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs} must be > 0 when max_steps is -1")
        unknown = set(self.include_for_metrics) - {"inputs", "loss"}
        if unknown:
            raise ValueError(f"include_for_metrics={self.include_for_metrics!r}: {sorted(unknown)} unknown; "
                             "use 'inputs' and/or 'loss'")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor} must be in [0, 1)")
        for name in ("logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (a count, or a fraction of max steps "
                                 "if < 1)")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(f"eval_steps={self.eval_steps} must be > 0")

    def _validate_loading_and_reporting(self) -> None:
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops={self.peak_tflops} must be a positive number of TFLOP/s per device")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} must be >= 1 or None (automatic)")
        if self.dataloader_prefetch_factor is not None and self.dataloader_num_workers == 0:
            raise ValueError(
                f"dataloader_prefetch_factor={self.dataloader_prefetch_factor} needs dataloader_num_workers > 0"
            )
        check_reporters(self.report_to)

    def _validate_best_model(self) -> None:
        metric_schedule = self.lr_scheduler_type in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)
        if metric_schedule and self.eval_strategy == IntervalStrategy.NO:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type.value!r} steps on an evaluation metric: "
                             "set eval_strategy to 'steps' or 'epoch' (metric_for_best_model picks the metric)")
        if self.load_best_model_at_end:
            self._validate_load_best_model_at_end()
            if self.optim.value in SCHEDULE_FREE_OPTIMIZERS:
                raise NotSupportedError(
                    f"load_best_model_at_end with optim={self.optim.value!r}: a checkpoint holds a schedule-free "
                    "optimizer's training point, not the averaged weights that were evaluated; train without it "
                    "(the trained model is left at its evaluation point) or use another optimizer")
        if (self.load_best_model_at_end or metric_schedule) and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"  # as HF's default
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _validate_load_best_model_at_end(self) -> None:
        if self.eval_strategy == IntervalStrategy.NO:
            raise ValueError("load_best_model_at_end=True needs eval_strategy 'steps' or 'epoch'")
        if self.save_strategy == SaveStrategy.NO:
            raise ValueError("load_best_model_at_end=True needs a save_strategy other than 'no'")
        if self.save_strategy != SaveStrategy.BEST and self.eval_strategy.value != self.save_strategy.value:
            raise ValueError(
                f"load_best_model_at_end=True needs save_strategy ({self.save_strategy.value}) to match "
                f"eval_strategy ({self.eval_strategy.value})"
            )
        if self.save_strategy == SaveStrategy.STEPS and self.eval_steps is not None \
                and self.save_steps % self.eval_steps != 0:
            raise ValueError(
                f"load_best_model_at_end=True needs save_steps ({self.save_steps}) to be a multiple of "
                f"eval_steps ({self.eval_steps}), so the best evaluated step is saved"
            )

    # --------------------------------------------------------------- helpers
    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_ratio is not None:
            return math.ceil(num_training_steps * self.warmup_ratio)
        if 0 < self.warmup_steps < 1:  # HF v5: a fraction of the total
            return math.ceil(num_training_steps * self.warmup_steps)
        return int(self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name in _TOKEN_FIELDS or f.name.endswith("_token"):
                value = "<redacted>" if value else value
            if hasattr(value, "value"):  # enums
                value = value.value
            if f.name == "parallelism_config" and value is not None:  # as a dict: it loads back as one
                value = value.sizes()
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """Flat, W&B/TensorBoard-friendly values (lists and dicts as strings)."""
        return {
            k: (v if isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in self.to_dict().items()
        }


# (field, smallest value, what the error says it must be); None is always allowed where the field may be None
_LOWER_BOUNDS = (
    ("per_device_train_batch_size", 1, ">= 1"), ("per_device_eval_batch_size", 1, ">= 1"),
    ("gradient_accumulation_steps", 1, ">= 1"), ("learning_rate", 0, ">= 0"),
    ("eval_accumulation_steps", 1, ">= 1 or None"), ("torch_empty_cache_steps", 1, ">= 1 or None"),
    ("save_total_limit", 1, ">= 1 or None (keep all)"),
)

_UNSUPPORTED_HINTS = {
    "average_tokens_across_devices": "scaletrain always normalises the loss by the global token count",
    "push_to_hub": "export the saved folder and push it with huggingface_hub",
}


def _hf_fields(hf_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(hf_class) if f.init}


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _with_hf_declarations(name: str, hf_class: type, bases: tuple[type, ...]) -> type:
    """The fields of `bases`, plus every other field of `hf_class` at its HF default.

    Every field with an HF name is declared with HF's type and metadata (help,
    nargs): HfArgumentParser then parses a command line, JSON or YAML file
    exactly as it does for HF's class (bare `--gradient_checkpointing`,
    `--include_num_input_tokens_seen no`, ...). Defaults stay scaletrain's.
    """
    own_fields = {name: f for base in bases for name, f in _hf_fields(base).items()}
    declared = []
    for hf_name, hf_field in _hf_fields(hf_class).items():
        source = own_fields.get(hf_name, hf_field)
        if source.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=source.default_factory, metadata=hf_field.metadata, repr=hf_name in own_fields)
        else:
            spec = field(default=source.default, metadata=hf_field.metadata, repr=hf_name in own_fields)
        declared.append((hf_name, hf_field.type, spec))
    cls = dataclasses.make_dataclass(name, declared, bases=bases)
    cls.__module__ = __name__
    return cls


_OWN_FIELDS = set(_hf_fields(_ScaletrainArguments))
# values HF's __post_init__ rewrites to its canonical spelling: HfArgumentParser leaves an absent --debug at None
_HF_SPELLINGS = {"debug": {None: ""}}
_UNSUPPORTED_DEFAULTS = {
    name: _default_of(f) for name, f in _hf_fields(transformers.TrainingArguments).items() if name not in _OWN_FIELDS
}

TrainingArguments = _with_hf_declarations("TrainingArguments", transformers.TrainingArguments, (_ScaletrainArguments,))
TrainingArguments.__doc__ = _ScaletrainArguments.__doc__ or __doc__


@dataclass
class _Seq2SeqFields:
    sortish_sampler: bool = False
    predict_with_generate: bool = False
    generation_max_length: Optional[int] = None
    generation_num_beams: Optional[int] = None
    generation_config: Optional[Any] = None


Seq2SeqTrainingArguments = _with_hf_declarations("Seq2SeqTrainingArguments", transformers.Seq2SeqTrainingArguments,
                                                 (TrainingArguments, _Seq2SeqFields))


def _check_seq2seq(self) -> None:
    TrainingArguments.__post_init__(self)
    if self.sortish_sampler:
        raise NotSupportedError("Seq2SeqTrainingArguments.sortish_sampler=True is not supported yet by scaletrain")


Seq2SeqTrainingArguments.__post_init__ = _check_seq2seq
