"""The `scaletrain plan CONFIG --gpus N [...]` command: options, model, table (the model is plan.py's)."""
from __future__ import annotations

import argparse
import sys

from .estimate import precision_of
from .memory import format_bytes, parse_bytes
from ..parallel.pipeline import check_pipeline_split
from .plan import (Hardware, Layout, PlanShape, command_line, default_peak_tflops, describe_fit, plan, plan_table,
                   predict_memory, tp_candidates)
from ..args.run_config import ConfigError, load_config, resolve_config_path
from ..parallel.layout import layout_sizes
from ..tasks import build_model_on_meta

DEFAULTS = {"gpus_per_node": 8, "gpu_memory": "80GiB", "efficiency": 0.5, "intra_node_gbps": 370.0,
            "inter_node_gbps": 40.0, "top": 5}


def add_plan_parser(sub) -> None:
    plan_parser = sub.add_parser(
        "plan", help="rank the layouts (dp_replicate x dp_shard x tp, micro-batch, activation checkpointing) a "
                     "config's model can train with on N GPUs: predicted memory per GPU, step time, the command")
    plan_parser.add_argument("config", help="YAML file or built-in recipe (its model, precision, sequence length)")
    plan_parser.add_argument("overrides", nargs=argparse.REMAINDER, help=(
        "--gpus N (required) --gpus-per-node 8 --gpu-memory 80GiB --seq-len (default: data.block_size or "
        "data.max_length) "
        "--global-batch (default: per_device_train_batch_size x gradient_accumulation_steps x gpus) --top 5 "
        "--peak-tflops (default: H100 SXM's) --efficiency 0.5 --intra-node-gbps 370 --inter-node-gbps 40, "
        "and --field value pairs"))


_FLAGS = {"--gpus": "gpus", "--gpus-per-node": "gpus_per_node", "--gpu-memory": "gpu_memory",
          "--seq-len": "seq_len", "--global-batch": "global_batch", "--top": "top", "--peak-tflops": "peak_tflops",
          "--efficiency": "efficiency", "--intra-node-gbps": "intra_node_gbps",
          "--inter-node-gbps": "inter_node_gbps"}


def run_plan(config: str, overrides: list[str], pop_flags) -> int:
    """Print the best layouts; 2 on bad input (naming it), 0 otherwise."""
    try:
        overrides, options = pop_flags(overrides, _FLAGS)
        cfg = load_config(resolve_config_path(config), overrides)
        hw, precision, seq_len, global_batch = _settings(cfg, options)
        overrides = [*overrides, *_sequence_override(cfg, seq_len)]
        model = build_model_on_meta(cfg)
        shape = PlanShape.of(model, tp_candidates(hw.gpus_per_node), cfg.training)
        fits, too_big = plan(shape, hw, precision, seq_len, global_batch)
        top = _number(options, "top", int, DEFAULTS["top"])
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"scaletrain: plan error: {exc}", file=sys.stderr)
        return 2
    shown = fits[:top] or too_big[:top]
    print(f"{type(model).__name__}: {shape.model.parameters:,} trainable parameters "
          f"({shape.tp_split:,} in layers tensor parallelism splits; tp sizes it allows: "
          f"{', '.join(map(str, shape.tp_sizes))}), {precision}, sequence {seq_len}, global batch {global_batch} "
          f"rows, AdamW")
    print(f"Assumed: {hw.assumptions()}. Step times are this model's, not measurements; memory is the model "
          "checked against measured runs (within 15%).")
    print(f"{len(fits)} of {len(fits) + len(too_big)} meshes fit with some micro-batch; "
          f"{describe_fit(fits[0] if fits else None, hw)}\n")
    print("\n".join(plan_table(shown, hw, seq_len, global_batch)))
    print("\nTo run:")
    for number, prediction in enumerate(shown, 1):
        print(f"  {number}. "
              + command_line(prediction.layout, hw, config, tuple(overrides),
                             bool(cfg.training.activation_checkpointing_kwargs)))
    return 0


def configured_layout_lines(cfg, world_sizes: list[int]) -> list[str]:
    """`scaletrain estimate` for a config with parallelism_config: its layout's memory per GPU (plan's model)
    at each world size it lays out."""
    config, args = cfg.training.parallelism_config, cfg.training
    if config is None or args.strategy not in ("ddp", "fsdp", "auto"):  # ZeRO's rows are in the table above
        return []
    model = build_model_on_meta(cfg)
    shape = PlanShape.of(model, range(1, config.tp_size + 1), args)
    if config.pp_size > 1:
        check_pipeline_split(model, config.pp_stages, config.pp_split_points)  # names why it cannot be cut
    precision = precision_of(args)
    lines = []
    for world in world_sizes:
        try:
            sizes = layout_sizes(config, world)
        except ValueError:  # the config does not lay out this many ranks
            continue
        dp_replicate, dp_shard, tp, sp, pp = sizes
        layout = Layout(dp_replicate, dp_shard, tp, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                        bool(args.activation_checkpointing), sp,
                        sharded=args.strategy == "fsdp" if sp > 1 or pp > 1 else None, pp=pp,
                        schedule=config.pp_schedule, stages_per_rank=config.pp_stages_per_rank,
                        split_points=tuple(config.pp_split_points) if config.pp_split_points else None)
        memory = predict_memory(shape, layout, precision, cfg.data.block_size or cfg.data.max_length)
        lines.append(f"parallelism_config on {world} ranks ({layout.describe()}, {layout.strategy}): "
                     f"{format_bytes(sum(memory.values()))} per rank = "
                     + ", ".join(f"{kind} {format_bytes(size)}" for kind, size in memory.items()))
    return lines or [f"parallelism_config lays out none of {world_sizes} ranks; pass --world-size to match it"]


def _settings(cfg, options: dict[str, str]):
    if cfg.training.lora is not None:
        raise ValueError("plan models full fine-tuning (every parameter trained with AdamW, its state sharded by "
                         "the layout); LoRA trains an adapter: drop training.lora from the config to plan the full "
                         "model")
    if "gpus" not in options:
        raise ValueError("--gpus N is required: the number of GPUs to plan for")
    args = cfg.training
    precision = precision_of(args)
    gpus = _number(options, "gpus", int, None)
    hw = Hardware(
        gpus=gpus, gpus_per_node=_number(options, "gpus_per_node", int, DEFAULTS["gpus_per_node"]),
        memory=parse_bytes(options.get("gpu_memory", DEFAULTS["gpu_memory"]), "--gpu-memory"),
        peak_tflops=_number(options, "peak_tflops", float, default_peak_tflops(precision)),
        efficiency=_number(options, "efficiency", float, DEFAULTS["efficiency"]),
        intra_node_gbps=_number(options, "intra_node_gbps", float, DEFAULTS["intra_node_gbps"]),
        inter_node_gbps=_number(options, "inter_node_gbps", float, DEFAULTS["inter_node_gbps"]))
    seq_len = _number(options, "seq_len", int, cfg.data.block_size or cfg.data.max_length)
    default_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus
    return hw, precision, seq_len, _number(options, "global_batch", int, default_batch)


def _sequence_override(cfg, seq_len: int) -> list[str]:
    """The config field that gives the planned sequence length, when --seq-len changed it."""
    field = "block_size" if cfg.data.block_size else "max_length"
    return [] if getattr(cfg.data, field) == seq_len else [f"--data.{field}", str(seq_len)]


def _number(options: dict[str, str], name: str, kind, default):
    if name not in options:
        return default
    flag = "--" + name.replace("_", "-")
    try:
        value = kind(options[name])
    except ValueError:
        raise ValueError(f"{flag} {options[name]!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value <= 0:
        raise ValueError(f"{flag} {value} must be positive")
    return value

