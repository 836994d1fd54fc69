"""Each backend's options, checked by the backend's own module when the arguments are built."""
from __future__ import annotations

from ..errors import NotSupportedError
from .deepspeed import check_options as check_deepspeed_options
from .fsdp import check_options as check_fsdp_options
from .precision import check_options as check_precision_options


def check_strategy_options(args) -> None:
    """Raise for an option of one backend set under another (it would be ignored) or an invalid one."""
    for check in (check_fsdp_options, check_deepspeed_options, check_precision_options, check_node_local_saves,
                  check_layout):
        check(args)


# strategy -> the parallelism_config sizes it can run above 1, and what to use for the others
_LAYOUTS = {
    "ddp": ({"dp_replicate_size", "tp_size", "sp_size"},
            "DDP replicates the whole model (tensor-parallel layers split over tp_size): use dp_replicate_size, or "
            "strategy fsdp to shard (dp_shard_size) or to run pipeline stages (pp_size)"),
    "fsdp": ({"dp_replicate_size", "dp_shard_size", "tp_size", "sp_size", "pp_size"},
             "FSDP2 shards over dp_shard_size and replicates over dp_replicate_size (HSDP)"),
    **{f"zero{stage}": ({"dp_shard_size"}, "DeepSpeed ZeRO partitions over every rank, and neither its AutoTP nor "
                                           "its Ulysses (DistributedAttention) is wired for training here: use "
                                           "dp_shard_size only, or strategy fsdp for HSDP, tensor and sequence "
                                           "parallelism") for stage in (1, 2, 3)},
    "single": (set(), "one process has nothing to divide"),
}


def check_layout(args) -> None:
    """A parallelism_config size the strategy cannot honour is refused (the dimensions scaletrain does not
    build yet were refused by the config itself), as are options that would see one sp rank's slice of a row."""
    config = args.parallelism_config
    if config is None:
        return
    if config.sp_size > 1:
        _check_sequence_split_options(args, config.sp_size)
    if config.pp_size > 1:
        check_pipeline_options(args, config)
    if args.strategy == "auto":
        return
    allowed, hint = _LAYOUTS[args.strategy]
    for name in ("dp_replicate_size", "dp_shard_size", "tp_size", "sp_size", "pp_size"):
        value = getattr(config, name)
        if value != 1 and name not in allowed:
            raise ValueError(f"parallelism_config {name}={value} with strategy {args.strategy!r}: {hint}")


def _check_sequence_split_options(args, sp: int) -> None:
    for name, value, why in (
        ("use_liger_kernel", args.use_liger_kernel, "Liger's fused loss is not checked with labels shifted over "
                                                    "rows split across ranks"),
        ("label_smoothing_factor", args.label_smoothing_factor, "the label smoother would shift a slice's labels "
                                                                "again and average over one rank's slice"),
        ("neftune_noise_alpha", args.neftune_noise_alpha, "NEFTune scales its noise by the sequence length, which "
                                                          "each rank sees as its slice's"),
    ):
        if value:
            raise NotSupportedError(f"{name}={value} with parallelism_config sp_size={sp}: {why}; drop one of them")


def check_pipeline_options(args, config) -> None:
    """What pipeline stages (pp_size) do not run with, refused by name; and the step's micro-batches, which are
    the pipeline's."""
    pp = config.pp_size
    if config.sp_size > 1:
        raise NotSupportedError(f"parallelism_config sp_size={config.sp_size} with pp_size={pp}: sequence-split "
                                "pipeline stages are not wired yet; drop one of them")
    for name, value, why in (
        ("fp16", args.fp16, "the loss scaler's overflow check is not reduced over pipeline stages; use bf16"),
        ("label_smoothing_factor", args.label_smoothing_factor, "the last stage computes the model's own loss"),
        ("use_liger_kernel", args.use_liger_kernel, "Liger's fused loss is not run by the last stage"),
        ("neftune_noise_alpha", args.neftune_noise_alpha, "NEFTune is not checked on a pipeline's first stage"),
        ("float8", args.float8, "float8 layers are not checked on pipeline stages yet"),
        ("torch_compile", args.torch_compile, "compiled stages are not checked yet"),
        ("auto_find_batch_size", args.auto_find_batch_size, "the batch finder's probe runs the whole model"),
        ("fsdp_low_memory_init", args.fsdp_low_memory_init, "each rank loads the model and keeps its stages"),
        ("fsdp_prefetch", args.fsdp_prefetch, "a stage's blocks are prefetched by FSDP2 itself"),
        ("predict_with_generate", getattr(args, "predict_with_generate", False),
         "generation runs the whole model on one rank"),
    ):
        if value:
            raise NotSupportedError(f"{name}={value} with parallelism_config pp_size={pp}: "
                                    f"{why}; drop one of them")
    steps = args.gradient_accumulation_steps
    if config.pp_microbatches is not None and config.pp_microbatches != steps:
        raise ValueError(f"parallelism_config pp_microbatches={config.pp_microbatches} with "
                         f"gradient_accumulation_steps={steps}: a step's micro-batches are the pipeline's; set "
                         f"gradient_accumulation_steps={config.pp_microbatches} (and leave pp_microbatches unset)")
    if config.schedule_fits(steps):
        return
    if config.pp_schedule == "1F1B":
        raise ValueError(f"parallelism_config pp_schedule='1F1B' with {config.pp_stages} stages needs at least "
                         f"{config.pp_stages} micro-batches per step, but gradient_accumulation_steps={steps}; "
                         f"raise it, or use pp_schedule='GPipe'")
    raise ValueError(f"parallelism_config pp_schedule='Interleaved1F1B' on {pp} pp ranks splits a step's "
                         f"micro-batches into equal rounds of about {pp}, which gradient_accumulation_steps={steps} "
                         f"cannot form; make it a multiple of {pp}")


def check_node_local_saves(args) -> None:
    """save_on_each_node: each node's first process writes a whole checkpoint on its own disk, which only a
    strategy whose every rank holds the whole state can do."""
    if not args.save_on_each_node:
        return
    tensor_parallel = args.parallelism_config is not None and args.parallelism_config.tp_size > 1
    if args.strategy not in ("auto", "single", "ddp") or tensor_parallel:
        raise NotSupportedError(
            f"save_on_each_node=True with strategy {args.strategy!r}: a sharded checkpoint holds every rank's "
            "shard, so the nodes must share one filesystem (drop save_on_each_node), or train with ddp")
    if args.save_async:
        raise NotSupportedError("save_on_each_node=True with save_async=True: node-local checkpoints are written "
                                "synchronously; drop one of them")
