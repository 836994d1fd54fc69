"""Throughput and per-rank memory of every strategy, at world size 1 and 2.

Each configuration trains the same GPT-2-style model (6 layers, d=512, 16k
vocabulary, ~27M parameters, fp32) with scaletrain's Trainer for a fixed
number of steps, launched as separate processes (torchrun for 2 ranks).

Measured per configuration:
- samples/s: global batch / median step time, skipping the warm-up steps;
- model state per rank (MiB): the distinct storages behind this rank's
  parameters, the tensors its optimizer steps and the optimizer state
  (Strategy.held_state_numel; gradients excluded). Exact, and shows what
  sharding saves;
- peak RSS per rank (MiB): the process's maximum resident set size
  (getrusage ru_maxrss; the largest over ranks). On CPU this is the memory
  that counts, but it includes ~0.5 GB of Python, torch and DeepSpeed, and
  glibc keeps freed memory, so it moves less than the state column.
On one CPU host both ranks share the same cores (1 thread per rank), so the
2-rank rows show communication and sharding overhead, not a speed-up.

    python benchmarks/strategies.py [--steps 12] [--only fsdp,zero3]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# where tables and plots go (a test points it at a temporary folder)
RESULTS = Path(os.environ.get("SCALETRAIN_BENCH_RESULTS", Path(__file__).parent / "results"))
SEQ, VOCAB, PER_RANK_BATCH, WARMUP = 64, 16384, 4, 3
CONFIGS = {
    "single": {"strategy": "single"},
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp+offload": {"strategy": "fsdp", "fsdp_cpu_offload": True},
    "zero1": {"strategy": "zero1"},
    "zero2": {"strategy": "zero2"},
    "zero3": {"strategy": "zero3"},
    "zero3+offload": {"strategy": "zero3", "offload_optimizer": True, "offload_params": True},
}


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=VOCAB, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def publish(name: str, lines: list[str], data: dict) -> None:
    """Print a benchmark's table and write it to results/<name>.md, its raw numbers to results/<name>.json."""
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))


def save_plot(figure, name: str) -> Path:
    """A benchmark's PNG beside its table: results/<name>.png."""
    figure.tight_layout()
    path = RESULTS / f"{name}.png"
    figure.savefig(path, dpi=110)
    return path


class TokenData(torch.utils.data.Dataset):
    """n fixed random token rows (seeded): causal-LM batches of a known shape for every benchmark."""

    def __init__(self, n: int, seq: int = SEQ, vocab: int = VOCAB) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def step_timer():
    """A TrainerCallback that records when each optimizer step ends (read with median_step_seconds)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    return StepTimes()


def median_step_seconds(timer, warmup: int) -> float:
    """The median step time after `warmup` steps."""
    return statistics.median(b - a for a, b in itertools.pairwise(timer.times[warmup - 1:]))


def worker(name: str, steps: int, out: str) -> None:
    from scaletrain import Trainer, TrainingArguments
    from scaletrain.strategies import build_strategy

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=PER_RANK_BATCH,
                                 learning_rate=1e-4, save_strategy="no", logging_steps=steps, disable_tqdm=True,
                                 report_to="none", optim="adamw_torch", **CONFIGS[name])
        strategy = build_strategy(args)
        strategy.setup_environment()
        model = strategy.build_model(build_model, build_model)
        timer = step_timer()
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(PER_RANK_BATCH * strategy.world_size * steps),
                          callbacks=[timer], strategy=strategy)
        trainer.train()
        held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        gathered = strategy.all_gather_object(peak_rss_mib)
        if strategy.is_main:
            Path(out).write_text(json.dumps({
                "world_size": strategy.world_size,
                "samples_per_s": PER_RANK_BATCH * strategy.world_size / median_step_seconds(timer, WARMUP),
                "state_mib_per_rank": held["bytes"] / 2**20,
                "held_numel": held,
                "peak_rss_mib": max(gathered),
                "threads_per_rank": torch.get_num_threads(),
            }))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)  # see CPU notes: gloo threads may abort a normal interpreter exit


def run_worker(argv: list[str], world: int) -> dict:
    """Run `python argv... OUT` alone (world 1) or under torchrun with 1 thread
    per core share, and return the JSON the worker wrote to OUT."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    proc = subprocess.run([*launcher, *argv, out], env=env, capture_output=True, text=True, timeout=1200,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} on {world} rank(s) failed:\n{proc.stderr[-4000:]}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def selected(names, only: str) -> list[str]:
    """`names` in order, or those of them a comma-separated --only lists."""
    return [n for n in names if not only or n in only.split(",")]


def run_each(names: list[str], argv_for, world: int) -> dict[str, dict]:
    """Each named setting in its own run (`argv_for(name)`: the script's worker command), printed as it ends."""
    rows = {}
    for name in names:
        rows[name] = run_worker(argv_for(name), world)
        print(name, rows[name], flush=True)
    return rows


def cpu_device() -> str:
    """How the results name this host: 'CPU: x86_64, 2 cores'."""
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_config(name: str, world: int, steps: int) -> dict:
    return run_worker([str(Path(__file__).resolve()), "--worker", name, "--steps", str(steps), "--out"], world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.steps, opts.out)
        return
    names = selected(CONFIGS, opts.only)
    rows = []
    for name in names:
        for world in (1,) if name == "single" else (1, 2):
            result = run_config(name, world, opts.steps)
            rows.append({"strategy": name, **result})
            print(f"{name:>14} x{world}: {result['samples_per_s']:7.2f} samples/s  "
                  f"state {result['state_mib_per_rank']:7.1f} MiB/rank  "
                  f"peak RSS {result['peak_rss_mib']:7.0f} MiB", flush=True)

    baseline = next((r["samples_per_s"] for r in rows if r["strategy"] == "single"), None)
    device = cpu_device()
    lines = [
        f"# Strategies: throughput and memory per rank ({device})",
        "",
        f"GPT-2-style model, 6 layers, d=512, vocab {VOCAB} (~27M params), fp32, seq {SEQ}, "
        f"{PER_RANK_BATCH} samples per rank per step, AdamW; median over steps {WARMUP + 1}-{opts.steps}.",
        "State = distinct storages of the parameters, optimizer-stepped tensors and optimizer state one rank holds "
        "(gradients excluded).",
        "Peak RSS = max over ranks of getrusage ru_maxrss (includes ~0.5 GB of libraries).",
        "Both ranks share one host's cores, so x2 rows measure overhead, not scaling.",
        "",
        "| strategy | ranks | samples/s | vs single | state MiB/rank | peak RSS MiB/rank |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['samples_per_s'] / baseline:.2f}x" if baseline else "-"
        lines.append(f"| {r['strategy']} | {r['world_size']} | {r['samples_per_s']:.2f} | {ratio} | "
                     f"{r['state_mib_per_rank']:.1f} | {r['peak_rss_mib']:.0f} |")
    publish("strategies-cpu", lines, {"device": device, "torch": torch.__version__, "steps": opts.steps, "rows": rows})
    from plots import plot_strategies

    plot_strategies({"device": device, "rows": rows})


if __name__ == "__main__":
    main()
