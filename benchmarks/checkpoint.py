"""Checkpoint cost: how long training waits per save (synchronous vs
save_async), the run's wall time with 4 saves, and the time to load a
checkpoint on resume, for single (1 process), ddp and fsdp (2 ranks).

Same ~27M-parameter GPT-2-style model as benchmarks/strategies.py (fp32,
AdamW: ~310 MiB of model + optimizer state per full copy). Each run trains 8
steps and saves every 2; sync and async runs of one strategy run back to back.

    python benchmarks/checkpoint.py
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from strategies import PER_RANK_BATCH, TokenData, build_model, cpu_device, publish, run_worker  # noqa: E402

STEPS, SAVE_EVERY = 8, 2
RUNS = [("single", 1), ("ddp", 2), ("fsdp", 2)]


def worker(strategy_name: str, asynchronous: bool, out: str, tmp: str) -> None:
    import torch

    from scaletrain import Trainer, TrainingArguments
    from scaletrain.strategies import build_strategy

    # every rank writes into the same folder, made by the parent
    def args():
        return TrainingArguments(output_dir=tmp, strategy=strategy_name, max_steps=STEPS, save_steps=SAVE_EVERY,
                                 per_device_train_batch_size=PER_RANK_BATCH, learning_rate=1e-4,
                                 logging_steps=STEPS, disable_tqdm=True, optim="adamw_torch",
                                 save_async=asynchronous)

    strategy = build_strategy(args())
    strategy.setup_environment()
    data = TokenData(PER_RANK_BATCH * strategy.world_size * STEPS)
    trainer = Trainer(model=strategy.build_model(build_model, build_model), args=args(), train_dataset=data,
                      strategy=strategy)
    blocking, save = [], trainer.checkpoints.save

    def timed_save(*a, **kw):
        path = save(*a, **kw)
        blocking.append(trainer.checkpoints.last_save_blocking_s)
        return path

    trainer.checkpoints.save = timed_save
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(tmp, f"checkpoint-{STEPS}").rglob("*") if p.is_file())

    resumed = Trainer(model=strategy.build_model(build_model, build_model), args=args(), train_dataset=data,
                      strategy=strategy)
    load, loads = resumed.checkpoints.load, []

    def timed_load(*a, **kw):
        begin = time.perf_counter()
        result = load(*a, **kw)
        loads.append(time.perf_counter() - begin)
        return result

    resumed.checkpoints.load = timed_load
    resumed.train(resume_from_checkpoint=str(Path(tmp, f"checkpoint-{STEPS}")))
    if strategy.is_main:
        Path(out).write_text(json.dumps({
            "save_blocking_s": statistics.median(blocking), "saves": len(blocking), "train_wall_s": wall,
            "load_s": loads[0], "checkpoint_mib": size / 2**20, "threads_per_rank": torch.get_num_threads(),
        }))
    strategy.teardown()
    sys.stdout.flush()
    os._exit(0)


def run(strategy_name: str, world: int, asynchronous: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="ckpt-bench-")  # shared by the ranks
    try:
        return run_worker([str(Path(__file__).resolve()), "--worker", strategy_name, str(int(asynchronous)), folder],
                          world)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3] == "1", out=sys.argv[5], tmp=sys.argv[4])
        return
    rows = []
    for name, world in RUNS:
        for asynchronous in (False, True):
            result = {"strategy": name, "ranks": world, "mode": "async" if asynchronous else "sync",
                      **run(name, world, asynchronous)}
            rows.append(result)
            print(f"{name:>7} x{world} {result['mode']:>5}: waits {result['save_blocking_s']:.3f} s/save, "
                  f"train {result['train_wall_s']:.1f} s, load {result['load_s']:.2f} s", flush=True)
    device = cpu_device()
    lines = [
        f"# Checkpoint save/load cost ({device})",
        "",
        f"~27M-parameter model + AdamW state, fp32; {STEPS} steps with a save every {SAVE_EVERY}; "
        "'waits' = median time training is blocked per save; 'train' includes all saves; "
        "'load' = restoring model, optimizer, scheduler and RNG on resume.",
        "",
        "| strategy | ranks | mode | waits s/save | async/sync wait | train wall s | load s | checkpoint MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sync = next(x for x in rows if x["strategy"] == r["strategy"] and x["mode"] == "sync")
        lines.append(f"| {r['strategy']} | {r['ranks']} | {r['mode']} | {r['save_blocking_s']:.3f} | "
                     f"{r['save_blocking_s'] / sync['save_blocking_s']:.2f}x | {r['train_wall_s']:.1f} | "
                     f"{r['load_s']:.2f} | {r['checkpoint_mib']:.0f} |")
    publish("checkpoint-cpu", lines, {"device": device, "rows": rows})
    from plots import plot_checkpoint

    plot_checkpoint({"device": device, "rows": rows})


if __name__ == "__main__":
    main()
