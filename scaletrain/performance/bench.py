"""`scaletrain bench CONFIG`: the user's own config timed for a short run per strategy and micro-batch
(optionally with and without activation checkpointing and torch.compile), under whatever launcher started
it. Every configuration trains in the same processes, one after the other, with its strategy rebuilt from
its arguments (as a search trial is). Per configuration: tokens/s and TFLOP/s per rank at steady state
(the median step after the warm-up steps), MFU where the peak is known, the memory one rank held (the CUDA
allocator's peak; on CPU the model state one rank holds, since a process's peak RSS only grows) next to
`scaletrain estimate`'s prediction, and which configuration is fastest among those that ran.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchPoint:
    strategy: str
    micro_batch: int
    checkpointing: bool = False
    compiled: bool = False

    def label(self) -> str:
        extras = [name for name, on in (("ckpt", self.checkpointing), ("compile", self.compiled)) if on]
        return f"{self.strategy} mb{self.micro_batch}" + "".join(f"+{e}" for e in extras)


def bench_points(strategies: list[str], micro_batches: list[int], checkpointing: list[bool],
                 compiled: list[bool]) -> list[BenchPoint]:
    return [BenchPoint(*values) for values in itertools.product(strategies, micro_batches, checkpointing, compiled)]


class _StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def run_bench(cfg, env, task, points: list[BenchPoint], steps: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for point in points:
        with tempfile.TemporaryDirectory() as out:
            rows.append({"config": point.label(), **dataclasses.asdict(point), **_run_point(cfg, env, task, point,
                                                                                           steps, warmup, out)})
        gc.collect()
    return rows


def _point_args(cfg, point: BenchPoint, steps: int, out: str):
    """The config's training arguments for one point: a short run that saves, evaluates and reports nothing."""
    return dataclasses.replace(
        cfg.training, strategy=point.strategy, per_device_train_batch_size=point.micro_batch,
        activation_checkpointing=point.checkpointing, gradient_checkpointing=point.checkpointing,
        activation_checkpointing_kwargs=cfg.training.activation_checkpointing_kwargs if point.checkpointing else None,
        gradient_checkpointing_kwargs=None,
        torch_compile=point.compiled, max_steps=steps, output_dir=out, save_strategy="no", eval_strategy="no",
        logging_steps=steps, report_to=[], disable_tqdm=True, resume_from_checkpoint=None, load_best_model_at_end=False)


def _run_point(cfg, env, task, point: BenchPoint, steps: int, warmup: int, out: str) -> dict[str, Any]:
    from ..strategies import build_strategy
    from ..trainer import Trainer

    try:
        args = _point_args(cfg, point, steps, out)
        strategy = build_strategy(args, env)
    except ValueError as exc:  # NotSupportedError too: a combination the config cannot run
        return {"error": f"refused: {exc}"}
    strategy.setup_environment()
    if strategy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(strategy.device)
    timer = _StepTimes()
    model = strategy.build_model(task.load_model, task.build_model_from_config)
    trainer = Trainer(model=model, args=args, train_dataset=task.train_dataset, processing_class=task.tokenizer,
                      data_collator=task.data_collator, strategy=strategy, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the bench prints its own table
    try:
        metrics = trainer.train().metrics
    except torch.OutOfMemoryError as exc:  # the same shapes on every rank: each rank runs out at the same step
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    step = statistics.median(b - a for a, b in itertools.pairwise(timer.times[warmup - 1:]))
    per_step = metrics["train_runtime"] / steps  # rates below are per steady-state step instead
    held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)["bytes"]
    result = {"step_s": step, "tokens_per_s": metrics["train_tokens_per_second"] * per_step / step,
              "tflops_per_rank": metrics["train_tflops_per_rank"] * per_step / step,
              "state_gb_per_rank": held / 2**30,
              "peak_gb_per_rank": metrics["train_peak_memory_gb"] if strategy.device.type == "cuda" else None}
    if "train_mfu" in metrics:
        result["mfu"] = metrics["train_mfu"] * per_step / step
    trainer.model = trainer.model_wrapped = trainer.optimizer = None
    return result


def add_estimates(rows: list[dict[str, Any]], cfg, world_size: int) -> None:
    """`scaletrain estimate`'s per-rank prediction beside each measured row."""
    from ..middleware.chunked_loss import planned_loss_chunk
    from ..tasks import model_shape_from_config
    from ..middleware.activation_ckpt import every_and_selective
    from .estimate import estimate, precision_of

    shape, _ = model_shape_from_config(cfg)
    args = cfg.training
    precision = precision_of(args)
    _, selective = every_and_selective(args)
    for row in rows:
        chunk = planned_loss_chunk(args.chunked_loss, args.chunked_loss_tokens, shape, row["checkpointing"], precision)
        predicted = estimate(shape, row["strategy"], world_size, precision, row["micro_batch"], cfg.data.max_length,
                             1 if row["checkpointing"] else 0, args.offload_optimizer, args.offload_params,
                             accumulation=args.gradient_accumulation_steps, loss_chunk=chunk,
                             selective=selective)
        row["estimate_state_gb_per_rank"] = predicted.model_states / 2**30
        row["estimate_total_gb_per_rank"] = predicted.total / 2**30


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ran = [r for r in rows if "error" not in r]
    return max(ran, key=lambda r: r["tokens_per_s"]) if ran else None


def format_table(rows: list[dict[str, Any]], device: str, world_size: int) -> str:
    def gb(value) -> str:
        return f"{value:.3f}" if value is not None else "-"

    lines = [f"# scaletrain bench ({device}, {world_size} rank(s))", "",
             "| configuration | tokens/s | TFLOP/s/rank | MFU % | peak GB/rank | state GB/rank | estimate state GB | "
             "estimate total GB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error'][:90]} | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1f}" if "mfu" in r else "-"
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['tflops_per_rank']:.4f} | {mfu} | "
                     f"{gb(r['peak_gb_per_rank'])} | {gb(r['state_gb_per_rank'])} | "
                     f"{gb(r.get('estimate_state_gb_per_rank'))} | {gb(r.get('estimate_total_gb_per_rank'))} |")
    best = fastest(rows)
    lines += ["", f"fastest that ran: {best['config']} ({best['tokens_per_s']:.0f} tokens/s)" if best
              else "no configuration ran"]
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], table: str, out_dir: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"md": out / "bench.md", "json": out / "bench.json", "png": out / "bench.png"}
    written["md"].write_text(table + "\n")
    written["json"].write_text(json.dumps(rows, indent=2))
    _plot([r for r in rows if "error" not in r], written["png"])
    return written


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.6))
    axes.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:blue")
    axes.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=30, ha="right")
    axes.set_ylabel("tokens/s (steady state)")
    axes.set_title("scaletrain bench")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
