"""HF's `fsdp`, `fsdp_config` and `deepspeed` fields, translated into scaletrain's strategy and its
options (or refused where scaletrain's FSDP2 / ZeRO cannot honour them)."""
from __future__ import annotations

from ..errors import NotSupportedError
from .json_options import read_json_option

_HF_FSDP_OPTIONS = {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap"}
# HF/accelerate fsdp_config keys -> the TrainingArguments field that implements them
_HF_FSDP_CONFIG_KEYS = {
    "transformer_layer_cls_to_wrap": "fsdp_layer_classes",
    "reshard_after_forward": "fsdp_reshard_after_forward",
    "offload_params": "fsdp_cpu_offload",
    "cpu_ram_efficient_loading": "fsdp_low_memory_init",
    "version": None,
}


def apply_hf_sharding_fields(args) -> None:
    """Honour HF's `fsdp`/`fsdp_config`/`deepspeed` fields on `args`, or refuse what cannot be honoured."""
    if args.fsdp:
        _apply_fsdp_options(args)
    if args.fsdp_config:
        for key, value in read_json_option("fsdp_config", args.fsdp_config).items():
            _apply_fsdp_config_key(args, key.removeprefix("fsdp_"), value)
        claim_strategy(args, "fsdp", "fsdp_config")
    if args.deepspeed:
        _apply_deepspeed_config(args)


def claim_strategy(args, name: str, source: str) -> None:
    """`source` asks for strategy `name`: taken when the strategy is 'auto', refused when it names another."""
    if args.strategy == "auto":
        args.strategy = name
    elif args.strategy != name:
        raise ValueError(f"{source} asks for {name} but strategy={args.strategy!r}; keep one of them")


def _apply_fsdp_options(args) -> None:
    options = args.fsdp.split() if isinstance(args.fsdp, str) else list(args.fsdp)
    unknown = [o for o in options if o not in _HF_FSDP_OPTIONS]
    if unknown:
        raise NotSupportedError(
            f"fsdp={args.fsdp!r}: {unknown} not supported; scaletrain's FSDP2 takes 'full_shard', "
            "'shard_grad_op', 'hybrid_shard' or 'hybrid_shard_zero2', plus 'offload' and 'auto_wrap' (per-block "
            "wrapping is always on)"
        )
    claim_strategy(args, "fsdp", f"fsdp={args.fsdp!r}")
    if "shard_grad_op" in options or "hybrid_shard_zero2" in options:
        args.fsdp_reshard_after_forward = False
    if "hybrid_shard" in options or "hybrid_shard_zero2" in options:
        _hybrid_shard(args)
    if "offload" in options:
        args.fsdp_cpu_offload = True


def _hybrid_shard(args) -> None:
    """HF's hybrid_shard: shard within each node, replicate across nodes (HSDP)."""
    from ..parallel.config import ParallelismConfig
    from ..parallel.environment import read_env

    if args.parallelism_config is not None:
        raise ValueError(f"fsdp={args.fsdp!r} and parallelism_config both choose the layout; keep "
                         "parallelism_config (dp_replicate_size, dp_shard_size)")
    args.parallelism_config = ParallelismConfig(dp_replicate_size=-1, dp_shard_size=read_env().local_world_size)


def _apply_fsdp_config_key(args, key: str, value) -> None:
    if key not in _HF_FSDP_CONFIG_KEYS:
        raise NotSupportedError(
            f"fsdp_config key {key!r} is not supported by scaletrain's FSDP2; supported keys: "
            f"{sorted(_HF_FSDP_CONFIG_KEYS)} (or the fsdp_* TrainingArguments fields)"
        )
    if key == "version" and int(value) != 2:
        raise NotSupportedError(f"fsdp_config version={value}: only FSDP2 (fully_shard) is supported")
    field = _HF_FSDP_CONFIG_KEYS[key]
    if field:
        if key == "transformer_layer_cls_to_wrap" and isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        setattr(args, field, value)


def _apply_deepspeed_config(args) -> None:
    args.deepspeed = read_json_option("deepspeed", args.deepspeed)
    stage = args.deepspeed.get("zero_optimization", {}).get("stage")
    if args.strategy == "auto":
        if stage not in (1, 2, 3):
            raise ValueError(
                f"deepspeed config has zero_optimization.stage={stage!r}; set strategy: zero1, zero2 "
                "or zero3 (or a stage of 1-3 in the config)"
            )
        args.strategy = f"zero{stage}"
    elif not args.strategy.startswith("zero"):
        raise ValueError(f"a deepspeed config was given but strategy={args.strategy!r}; use zero1|zero2|zero3")
