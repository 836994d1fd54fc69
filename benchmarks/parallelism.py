"""Layouts of 4 ranks side by side: samples/s and the model state each rank holds, for flat FSDP, HSDP 2x2,
tensor parallelism x FSDP (tp2 x dp_shard2), DDP and tensor parallelism x replicas (tp2 x dp_replicate2).

Model: Llama-style (its HF tensor-parallel plan), 4 layers, d=256, 4 heads (2 key/value), vocab 8192, seq 256,
fp32, AdamW, 4 rows per data-parallel rank. Each layout runs in its own torchrun job through scaletrain's
Trainer; the step time is the median after a warm-up. On a CPU host the ranks share the cores, so the
throughput column ranks the layouts' overheads here, not what a GPU cluster gets: on GPUs, tensor parallelism
pays its all-reduces inside every layer for a 1/tp share of the weights and activations (benchmarks/gpu.sh
has the GPU rows).

    python benchmarks/parallelism.py [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategies import (TokenData, median_step_seconds, publish, run_worker, save_plot,  # noqa: E402
                        step_timer)  # the shared launcher, data, step timing and output

SEQ, VOCAB, LAYERS, HIDDEN, HEADS, KV_HEADS = 256, 8192, 4, 256, 4, 2
PER_RANK, WARMUP, WORLD = 4, 2, 4
LAYOUTS = {
    "fsdp 4": ("fsdp", {"dp_shard_size": 4}),
    "hsdp 2x2": ("fsdp", {"dp_replicate_size": 2, "dp_shard_size": 2}),
    "tp2 x fsdp2": ("fsdp", {"tp_size": 2, "dp_shard_size": 2}),
    "ddp 4": ("ddp", {"dp_replicate_size": 4}),
    "tp2 x ddp2": ("ddp", {"tp_size": 2, "dp_replicate_size": 2}),
}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ))


def worker(name: str, steps: int, out: str) -> None:
    import resource

    from scaletrain import Trainer, TrainingArguments

    strategy_name, layout = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=PER_RANK,
                                 learning_rate=1e-4, save_strategy="no", logging_steps=steps, disable_tqdm=True,
                                 report_to="none", optim="adamw_torch", strategy=strategy_name,
                                 parallelism_config=layout)
        timer = step_timer()
        dp_size = WORLD // layout.get("tp_size", 1)
        trainer = Trainer(model=build_model(), args=args, callbacks=[timer],
                          train_dataset=TokenData(PER_RANK * dp_size * steps, SEQ, VOCAB))
        trainer.train()
        strategy = trainer.strategy
        held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)
        states = strategy.all_gather_object(held["bytes"] / 2**20)
        rss = strategy.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if strategy.is_main:
            Path(out).write_text(json.dumps({
                "layout": strategy.layout.describe(), "dp_size": dp_size,
                "samples_per_s": PER_RANK * dp_size / median_step_seconds(timer, WARMUP),
                "state_mib_per_rank": max(states), "peak_rss_mib": max(rss),
            }))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)  # see CPU notes: gloo threads may abort a normal interpreter exit


def plot(data: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["rows"])
    figure, (speed, state) = plt.subplots(1, 2, figsize=(11, 3.8))
    speed.bar(range(len(names)), [data["rows"][n]["samples_per_s"] for n in names], color="tab:blue")
    speed.set_ylabel("samples/s (4 ranks)")
    state.bar(range(len(names)), [data["rows"][n]["state_mib_per_rank"] for n in names], color="tab:green")
    state.set_ylabel("model state MiB per rank")
    for axes in (speed, state):
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    figure.suptitle(f"Parallel layouts on 4 ranks ({data['device']})", fontsize=10)
    return save_plot(figure, "parallelism-cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts, rest = parser.parse_known_args()
    if opts.worker:
        worker(opts.worker, opts.steps, rest[-1])
        return
    me = str(Path(__file__).resolve())
    rows = {}
    for name in LAYOUTS:
        rows[name] = run_worker([me, "--worker", name, "--steps", str(opts.steps)], WORLD)
        print(name, rows[name], flush=True)
    device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    fsdp = rows["fsdp 4"]["samples_per_s"]
    lines = [f"# Parallel layouts on {WORLD} ranks ({device}, torch {torch.__version__})", "",
             f"Llama-style, {LAYERS} layers, d={HIDDEN}, {HEADS} heads ({KV_HEADS} kv), vocab {VOCAB}, seq {SEQ}, "
             f"fp32, AdamW; {PER_RANK} rows per data-parallel rank; median step after {WARMUP} warm-up steps.",
             "Model state = parameters, gradients and optimizer state a rank holds (its largest over ranks).", "",
             "| layout | data-parallel ranks | samples/s | vs fsdp 4 | model state MiB/rank | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} ({r['layout']}) | {r['dp_size']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / fsdp:.2f}x | {r['state_mib_per_rank']:.1f} | {r['peak_rss_mib']:.0f} |")
    data = {"device": device, "torch": torch.__version__, "rows": rows}
    publish("parallelism-cpu", lines, data)
    plot(data)


if __name__ == "__main__":
    main()
