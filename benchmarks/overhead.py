"""Trainer overhead: a hand-written PyTorch loop vs scaletrain's Trainer vs the HF Trainer.

Same model (small GPT-2 from a config), same data, optimizer (torch AdamW, no weight decay), LR
schedule, gradient clipping and step count, and the same math: the plain loop turns the KV cache off
in training forwards as both trainers do (it had been building one, which made a trainer look faster
than the loop it wraps). Every runner is timed over the same steady-state window: the median step time
after WARMUP steps, construction excluded. The runs are interleaved (order rotated) in every repetition
so machine noise hits all of them alike; the table reports medians and ratios of medians. --compiled
adds each runner under torch.compile (inductor). --world-size 2 runs each runner under torchrun on gloo
(the plain loop wraps DDP itself); every runner uses find_unused_parameters=False there, the setting a
hand-written loop would choose, so the rows compare loops rather than DDP settings. Two more rows show
what the DDP default costs: scaletrain with ddp_find_unused_parameters unset (it finds out from the first
step that nothing is unused and drops DDP's search) and with the search forced on (HF's default for a
model without activation checkpointing, and scaletrain's before it decided from the first step).

    python benchmarks/overhead.py [--steps 100] [--reps 5] [--threads N] [--compiled] [--world-size 2]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategies import TokenData  # noqa: E402  (one benchmark dataset)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def model_factory(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


WARMUP = 10  # steps left out of every runner's timing: first-iteration allocations, compilation


class StepClock:
    """Step end times: every runner is timed over the same steady-state steps, construction excluded."""

    def __init__(self) -> None:
        self.times: list[float] = [time.perf_counter()]

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def median_step(self) -> float:
        durations = [b - a for a, b in itertools.pairwise(self.times[WARMUP:])]
        return statistics.median(durations)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun


def plain_loop(data, batch: int, steps: int, lr: float, compiled: bool, token_sync: bool = False) -> float:
    """The best hand-written loop for the same math: no KV cache in training forwards (the trainers turn
    it off too), torch's AdamW with the trainers' arguments, clipping, the same schedule and shuffling;
    under torchrun DDP with a DistributedSampler. token_sync: the loss normalised by the global number of
    targets, as both trainers do (one all-reduce of the count per step); with rows of one length the
    per-rank mean is the same number, which is why the plain loop can skip it."""
    from transformers import get_linear_schedule_with_warmup

    model = model_factory()
    model.config.use_cache = False
    model.train()
    if compiled:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    if _distributed():
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler)
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    clock, done = StepClock(), 0
    while done < steps:
        for b in loader:
            loss = model(**b).loss
            if token_sync:
                local = (b["labels"][:, 1:] != -100).sum().double()
                total = local.clone()
                torch.distributed.all_reduce(total)
                loss = loss * (local * torch.distributed.get_world_size() / total).float()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            clock.tick()
            done += 1
            if done == steps:
                break
    return clock.median_step()


def _clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.times = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


def scaletrain_trainer(data, batch: int, steps: int, lr: float, compiled: bool, out: str,
                       find_unused: Optional[bool] = False) -> float:
    from scaletrain import Trainer, TrainingArguments

    clock = StepClock()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                             optim="adamw_torch", logging_steps=50, save_strategy="no", disable_tqdm=True,
                             report_to="none", strategy="ddp" if _distributed() else "single",
                             torch_threads=torch.get_num_threads(), torch_compile=compiled,
                             ddp_find_unused_parameters=find_unused)
    Trainer(model=model_factory(), args=args, train_dataset=data, callbacks=[_clock_callback(clock)]).train()
    return clock.median_step()


def hf_trainer(data, batch: int, steps: int, lr: float, compiled: bool, out: str) -> float:
    import transformers

    clock = StepClock()
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                          learning_rate=lr, optim="adamw_torch", logging_steps=50, save_strategy="no",
                                          disable_tqdm=True, report_to="none", use_cpu=True,
                                          dataloader_pin_memory=False, torch_compile=compiled,
                                          ddp_find_unused_parameters=False)
    transformers.Trainer(model=model_factory(), args=args, train_dataset=data,
                         callbacks=[_clock_callback(clock)]).train()
    return clock.median_step()


PLAIN = "plain PyTorch loop"
SYNCED = "plain loop + global token count"  # 2 ranks only: the trainers' loss normalisation, by hand
# 2 ranks only: scaletrain with DDP's unused-parameter search decided by the first step / forced on
DDP_DEFAULT, DDP_SEARCH = "scaletrain, ddp default", "scaletrain, unused-param search on"
RUNNERS = {PLAIN: plain_loop, SYNCED: plain_loop, "scaletrain Trainer": scaletrain_trainer,
           "HF Trainer": hf_trainer, DDP_DEFAULT: functools.partial(scaletrain_trainer, find_unused=None),
           DDP_SEARCH: functools.partial(scaletrain_trainer, find_unused=True)}
RANKS_ONLY = (SYNCED, DDP_DEFAULT, DDP_SEARCH)
SCRATCH = "/tmp/scaletrain-bench"


def _run_here(name: str, compiled: bool, opts) -> float:
    data = TokenData(opts.batch * opts.steps * opts.world_size, opts.seq, vocab=2048)
    runner = RUNNERS[name]
    if runner is plain_loop:
        return plain_loop(data, opts.batch, opts.steps, 1e-4, compiled, token_sync=name == SYNCED)
    return runner(data, opts.batch, opts.steps, 1e-4, compiled, f"{SCRATCH}/{name.split()[0].strip(',')}")


def _run_torchrun(name: str, compiled: bool, opts) -> float:
    """One runner under torchrun; rank 0's median step time comes back in a file."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "step.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.world_size}",
                   f"--master_port={_free_port()}", __file__, "--worker", name, "--result", str(result),
                   "--steps", str(opts.steps), "--batch", str(opts.batch), "--seq", str(opts.seq),
                   "--world-size", str(opts.world_size)] + (["--compiled"] if compiled else [])
        finished = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
        if not result.exists():
            raise RuntimeError(f"{name}: torchrun exited with {finished.returncode} before rank 0 wrote its time")
        if finished.returncode:  # seen once: a compiled HF run aborting in a thread destructor at exit
            print(f"{name}: timed, then torchrun exited with {finished.returncode} at teardown", flush=True)
        return json.loads(result.read_text())["median_step_seconds"]


def _free_port() -> int:
    """A port nobody listens on: a fixed one collides with the previous run's socket in TIME_WAIT."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(opts) -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    step = _run_here(opts.worker, opts.compiled, opts)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(opts.result).write_text(json.dumps({"median_step_seconds": step}))


def _options():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=1, help="ranks per runner (torchrun, gloo) when > 1")
    parser.add_argument("--compiled", action="store_true", help="also each runner under torch.compile (inductor)")
    parser.add_argument("--out", default=None, help="default: results/overhead-cpu (-ddp2 for 2 ranks)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.out is None:
        suffix = f"-ddp{opts.world_size}" if opts.world_size > 1 else ""
        opts.out = str(RESULTS / f"overhead-cpu{suffix}")
    return opts


def main() -> None:
    opts = _options()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.worker:
        return _worker(opts)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    run = _run_torchrun if opts.world_size > 1 else _run_here
    runners = {}
    for compiled in (False, True) if opts.compiled else (False,):
        tag = " (compiled)" if compiled else ""
        for name in RUNNERS:
            if name in RANKS_ONLY and opts.world_size == 1:
                continue
            runners[f"{name}{tag}"] = lambda n=name, c=compiled: run(n, c, opts)
    for runner in runners.values():  # warm-up: imports, allocator, kernels, the compile cache
        runner()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(opts.reps):
        # rotate who runs first so slow drifts (thermal, page cache) spread evenly
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(runners[name]())
        print(f"rep {rep + 1}/{opts.reps}: " + ", ".join(f"{n} {1e3 * t[-1]:.1f}ms" for n, t in times.items()),
              flush=True)
    _report(opts, times)


def _report(opts, times: dict[str, list[float]]) -> None:
    import transformers

    samples_per_step = opts.batch * opts.world_size
    med = {name: samples_per_step / statistics.median(ts) for name, ts in times.items()}
    plain, ours, hf = med[PLAIN], med["scaletrain Trainer"], med["HF Trainer"]

    def vs_plain(name: str) -> float:
        return _against(med, name, PLAIN)

    ranks = f"{opts.world_size} ranks (torchrun, gloo, DDP), " if opts.world_size > 1 else "1 process, "
    threads = "1 thread per rank" if opts.world_size > 1 else f"{torch.get_num_threads()} threads"
    header = (f"GPT-2 2x128 (vocab 2048), {ranks}batch {opts.batch} per rank x seq {opts.seq}, {opts.steps} "
              f"steps/run, median step time over steps {WARMUP + 1}-{opts.steps} (construction and warm-up "
              f"excluded), median of {opts.reps} interleaved runs, {threads}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    table = ["| runner | samples/s (median, all ranks) | vs plain loop (same compile setting) |", "|---|---:|---:|"]
    table += [f"| {name} | {sps:.1f} | {vs_plain(name):.3f}x |" for name, sps in med.items()]
    table.append(f"\nscaletrain / HF Trainer: **{ours / hf:.3f}x**")
    if DDP_DEFAULT in med:
        table.append(f"\nDDP default (search decided by the first step) / search on: "
                     f"**{_against(med, DDP_DEFAULT, DDP_SEARCH):.3f}x**")
    same_math = _vs_same_math_loop(med)
    if same_math:
        table.append("\nvs the plain loop with the trainers' global token count (the same loss math): " + ", ".join(
            f"{name} **{ratio:.3f}x**" for name, ratio in same_math.items()))
    text = header + "\n\n" + "\n".join(table)
    print("\n" + text)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    title = "Trainer overhead (CPU" + (f", {opts.world_size} ranks)" if opts.world_size > 1 else ")")
    Path(opts.out + ".md").write_text(f"# {title}\n\n{text}\n")
    Path(opts.out + ".json").write_text(json.dumps({
        "config": vars(opts), "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "step_seconds_median_per_rep": times, "samples_per_second_median": med,
        "ratio_vs_plain": {name: vs_plain(name) for name in med}, "scaletrain_vs_hf": ours / hf,
        "plain_samples_per_second": plain, "ratio_vs_plain_with_token_count": same_math,
    }, indent=2))
    _plot(med, opts.out + ".png", title)


def _against(med: dict[str, float], name: str, baseline: str) -> float:
    """A runner's throughput over the baseline runner's with the same compile setting."""
    return med[name] / med[baseline + (" (compiled)" if name.endswith(" (compiled)") else "")]


def _vs_same_math_loop(med: dict[str, float]) -> dict[str, float]:
    """On several ranks each trainer against the loop that also normalises by the global target count."""
    if SYNCED not in med:  # one process: no collective, so the plain loop already does the same math
        return {}
    return {name: _against(med, name, SYNCED) for name in med if not name.startswith((PLAIN, SYNCED))}


def _plot(med: dict[str, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(5, 1.1 * len(med) + 1), 3.6))
    colours = {PLAIN: "tab:gray", SYNCED: "silver", "scaletrain Trainer": "tab:blue", "HF Trainer": "tab:orange",
               DDP_DEFAULT: "tab:cyan", DDP_SEARCH: "tab:purple"}
    axes.bar(range(len(med)), list(med.values()), color=[colours[n.replace(" (compiled)", "")] for n in med])
    axes.set_xticks(range(len(med)), [n.replace(" (compiled)", "\n(compiled)").replace(" + ", "\n+ ") for n in med],
                    fontsize=7)
    axes.set_ylabel("samples/s (steady state)")
    axes.set_title(title.replace("Trainer overhead", "Trainer overhead vs a plain PyTorch loop"), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
