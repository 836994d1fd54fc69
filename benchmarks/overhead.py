"""Trainer overhead: a hand-written PyTorch loop vs scaletrain's Trainer vs the HF Trainer.

Same model (small GPT-2 from a config), same data, optimizer (AdamW, no weight decay), LR
schedule, gradient clipping and step count. The three runs are interleaved (order rotated) in
every repetition so machine noise hits all of them alike; the table reports
medians and the ratios of medians.

    python benchmarks/overhead.py [--steps 100] [--reps 5] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

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


def plain_loop(data, batch: int, steps: int, lr: float) -> float:
    from transformers import get_linear_schedule_with_warmup

    start = time.perf_counter()
    model = model_factory()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # the trainers' default
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    done = 0
    while done < steps:
        for b in loader:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def scaletrain_trainer(data, batch: int, steps: int, lr: float, out: str) -> float:
    from scaletrain import Trainer, TrainingArguments

    start = time.perf_counter()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                             optim="adamw_torch", logging_steps=50, save_strategy="no", disable_tqdm=True,
                             report_to="none", strategy="single", torch_threads=torch.get_num_threads())
    Trainer(model=model_factory(), args=args, train_dataset=data).train()
    return time.perf_counter() - start


def hf_trainer(data, batch: int, steps: int, lr: float, out: str) -> float:
    import transformers

    start = time.perf_counter()
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                          learning_rate=lr, optim="adamw_torch", logging_steps=50, save_strategy="no",
                                          disable_tqdm=True, report_to="none", use_cpu=True,
                                          dataloader_pin_memory=False)
    transformers.Trainer(model=model_factory(), args=args, train_dataset=data).train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "overhead-cpu"))
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    data = TokenData(opts.batch * opts.steps, opts.seq, vocab=2048)
    scratch = "/tmp/scaletrain-bench"
    runners = {
        "plain PyTorch loop": lambda: plain_loop(data, opts.batch, opts.steps, 1e-4),
        "scaletrain Trainer": lambda: scaletrain_trainer(data, opts.batch, opts.steps, 1e-4, scratch + "/st"),
        "HF Trainer": lambda: hf_trainer(data, opts.batch, opts.steps, 1e-4, scratch + "/hf"),
    }
    for run in runners.values():  # warm-up: imports, allocator, kernels
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(opts.reps):
        # rotate who runs first so slow drifts (thermal, page cache) spread evenly
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(runners[name]())
        print(f"rep {rep + 1}/{opts.reps}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)

    samples = opts.batch * opts.steps
    med = {name: samples / statistics.median(ts) for name, ts in times.items()}
    plain, ours, hf = med["plain PyTorch loop"], med["scaletrain Trainer"], med["HF Trainer"]
    rows = [(name, med[name], med[name] / plain) for name in runners]
    header = (f"GPT-2 2x128 (vocab 2048), batch {opts.batch} x seq {opts.seq}, {opts.steps} steps/run, "
              f"median of {opts.reps} interleaved runs, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    table = ["| runner | samples/s (median) | vs plain loop |", "|---|---:|---:|"]
    table += [f"| {name} | {sps:.1f} | {ratio:.3f}x |" for name, sps, ratio in rows]
    table.append(f"\nscaletrain / HF Trainer: **{ours / hf:.3f}x**")
    text = header + "\n\n" + "\n".join(table)
    print("\n" + text)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out + ".md").write_text(f"# Trainer overhead (CPU)\n\n{text}\n")
    Path(opts.out + ".json").write_text(json.dumps({
        "config": vars(opts), "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "seconds": times, "samples_per_second_median": med,
        "ratio_vs_plain": {name: med[name] / plain for name in med}, "scaletrain_vs_hf": ours / hf,
    }, indent=2))


if __name__ == "__main__":
    main()
