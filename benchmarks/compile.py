"""torch_compile vs eager, measured side by side in one run: tokens/s and TFLOP/s per rank of scaletrain's
Trainer on the GPT-2-style model of strategies.py (~27M parameters, fp32), in one process and on 2 ranks
(ddp: whole model compiled; fsdp: each block compiled). Steady state only: the median step time after
the warm-up steps, which hold the compilation.

    python benchmarks/compile.py [--steps 16] [--backend inductor]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategies import (PER_RANK_BATCH, SEQ, TokenData, build_model, cpu_device, publish,  # noqa: E402
                        run_worker, save_plot)

WARMUP = 4  # compiled steps recompile once for the training-mode guards; later steps are steady
CONFIGS = [("single", 1), ("ddp", 2), ("fsdp", 2)]


def worker(strategy_name: str, compiled: bool, backend: str, steps: int, out: str) -> None:
    from transformers import TrainerCallback

    from scaletrain import Trainer, TrainingArguments
    from scaletrain.strategies import build_strategy

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.begin = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=PER_RANK_BATCH,
                                 learning_rate=1e-4, save_strategy="no", logging_steps=steps, disable_tqdm=True,
                                 report_to="none", optim="adamw_torch", strategy=strategy_name,
                                 torch_compile_backend=backend if compiled else None)
        strategy = build_strategy(args)
        strategy.setup_environment()
        timer = StepTimes()
        trainer = Trainer(model=build_model(), args=args, callbacks=[timer], strategy=strategy,
                          train_dataset=TokenData(PER_RANK_BATCH * strategy.world_size * steps))
        metrics = trainer.train().metrics
        step = statistics.median(b - a for a, b in itertools.pairwise(timer.times[WARMUP - 1:]))
        tokens = PER_RANK_BATCH * SEQ * strategy.world_size
        flops_per_rank = metrics["train_tflops_per_rank"] * metrics["train_runtime"] * 1e12 / steps  # per step
        if strategy.is_main:
            Path(out).write_text(json.dumps({
                "world_size": strategy.world_size, "tokens_per_s": tokens / step,
                "tflops_per_rank": flops_per_rank / step / 1e12, "first_steps_s": timer.times[WARMUP - 1] -
                timer.begin, "threads_per_rank": torch.get_num_threads()}))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker[0], opts.worker[1] == "compiled", opts.backend, opts.steps, opts.out)
        return
    rows = []
    for name, world in CONFIGS:
        pair = {}
        for mode in ("eager", "compiled"):
            pair[mode] = run_worker([str(Path(__file__).resolve()), "--worker", name, mode, "--backend",
                                     opts.backend, "--steps", str(opts.steps), "--out"], world)
        rows.append({"strategy": name, **{f"{m}_{k}": v for m, r in pair.items() for k, v in r.items()}})
        print(f"{name} x{world}: eager {pair['eager']['tokens_per_s']:.0f} tok/s, compiled "
              f"{pair['compiled']['tokens_per_s']:.0f} tok/s", flush=True)
    device = cpu_device()
    lines = [f"# torch_compile ({opts.backend}) vs eager ({device})", "",
             f"GPT-2-style model, 6 layers, d=512 (~27M params), fp32, seq {SEQ}, {PER_RANK_BATCH} rows per rank "
             f"per step, AdamW; median step time over steps {WARMUP + 1}-{opts.steps} (the first steps compile).",
             "Both ranks of a x2 row share the host's cores.", "",
             "| strategy | ranks | eager tok/s | compiled tok/s | compiled / eager | eager TFLOP/s/rank | "
             "compiled TFLOP/s/rank | first 4 steps s, eager / compiled |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['eager_world_size']} | {r['eager_tokens_per_s']:.0f} | "
                     f"{r['compiled_tokens_per_s']:.0f} | {r['compiled_tokens_per_s'] / r['eager_tokens_per_s']:.2f}x "
                     f"| {r['eager_tflops_per_rank']:.4f} | {r['compiled_tflops_per_rank']:.4f} | "
                     f"{r['eager_first_steps_s']:.1f} / {r['compiled_first_steps_s']:.1f} |")
    publish("compile-cpu", lines, {"device": device, "torch": torch.__version__, "backend": opts.backend,
                                   "steps": opts.steps, "rows": rows})
    _plot(rows, opts.backend)


def _plot(rows: list[dict], backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['strategy']} x{r['eager_world_size']}" for r in rows]
    x = range(len(rows))
    axes.bar([i - 0.2 for i in x], [r["eager_tokens_per_s"] for r in rows], width=0.4, label="eager")
    axes.bar([i + 0.2 for i in x], [r["compiled_tokens_per_s"] for r in rows], width=0.4, label=f"compiled ({backend})")
    axes.set_xticks(list(x), labels)
    axes.set_ylabel("tokens/s (steady state)")
    axes.set_title("torch_compile vs eager, CPU")
    axes.legend()
    save_plot(figure, "compile-cpu")


if __name__ == "__main__":
    main()
