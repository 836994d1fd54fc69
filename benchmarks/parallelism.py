"""Layouts of 4 ranks side by side: samples/s, the model state each rank holds and its peak memory in a
micro-step measured against `scaletrain plan`'s prediction, for flat FSDP, HSDP 2x2, tensor parallelism x FSDP
(tp2 x dp_shard2), DDP, tensor parallelism x replicas (tp2 x dp_replicate2), and Ulysses sequence parallelism
under FSDP (sp2 x dp_shard2, sp4) and DDP (sp2 x dp_replicate2), with and without activation checkpointing.

Model: Llama-style (its HF tensor-parallel plan), 4 layers, d=256, 4 heads (2 key/value), vocab 8192, seq 256,
fp32, AdamW, 4 rows per data-parallel rank. Each layout runs in its own torchrun job through scaletrain's
Trainer; the step time is the median after a warm-up. On a CPU host the ranks share the cores, so the
throughput column ranks the layouts' overheads here, not what a GPU cluster gets: on GPUs, tensor parallelism
pays its all-reduces inside every layer for a 1/tp share of the weights and activations (benchmarks/gpu.sh
has the GPU rows).

    python benchmarks/parallelism.py [--steps 8] [--only "fsdp 4,tp2 x ddp2"]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategies import (TokenData, cpu_device, median_step_seconds, publish, run_each, save_plot,  # noqa: E402
                        selected, step_timer)  # the shared launcher, data, step timing and output

SEQ, VOCAB, LAYERS, HIDDEN, HEADS, KV_HEADS = 256, 8192, 4, 256, 4, 2
PER_RANK, WARMUP, WORLD = 4, 2, 4
LAYOUTS = {
    "fsdp 4": ("fsdp", {"dp_shard_size": 4}),
    "hsdp 2x2": ("fsdp", {"dp_replicate_size": 2, "dp_shard_size": 2}),
    "tp2 x fsdp2": ("fsdp", {"tp_size": 2, "dp_shard_size": 2}),
    "ddp 4": ("ddp", {"dp_replicate_size": 4}),
    "tp2 x ddp2": ("ddp", {"tp_size": 2, "dp_replicate_size": 2}),
    "sp2 x fsdp2": ("fsdp", {"sp_size": 2, "dp_shard_size": 2}),
    "sp4 fsdp": ("fsdp", {"sp_size": 4, "dp_shard_size": 1}),
    "sp2 x ddp2": ("ddp", {"sp_size": 2, "dp_replicate_size": 2}),
    "sp2 x fsdp2 checkpointed": ("fsdp", {"sp_size": 2, "dp_shard_size": 2}),
    "sp4 fsdp checkpointed": ("fsdp", {"sp_size": 4, "dp_shard_size": 1}),
}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ))


def _planned_peak(strategy: str, layout: dict, checkpointing: bool) -> float:
    """`scaletrain plan`'s memory model for this layout: bytes per rank at a micro-step's peak."""
    from scaletrain.performance.plan import Layout, PlanShape, predict_memory

    sizes = (layout.get("dp_replicate_size", 1), layout.get("dp_shard_size", 1), layout.get("tp_size", 1))
    shape = PlanShape.of(build_model(), range(1, WORLD + 1))
    planned = Layout(*sizes, PER_RANK, 1, checkpointing, layout.get("sp_size", 1), sharded=strategy == "fsdp")
    return sum(predict_memory(shape, planned, "fp32", SEQ).values())


def worker(name: str, steps: int, out: str) -> None:
    import resource

    from scaletrain import Trainer, TrainingArguments

    strategy_name, layout = LAYOUTS[name]
    checkpointing = name.endswith("checkpointed")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=PER_RANK,
                                 learning_rate=1e-4, save_strategy="no", logging_steps=steps, disable_tqdm=True,
                                 report_to="none", optim="adamw_torch", strategy=strategy_name,
                                 parallelism_config=layout, activation_checkpointing=checkpointing)
        timer = step_timer()
        dp_size = WORLD // layout.get("tp_size", 1) // layout.get("sp_size", 1)
        trainer = Trainer(model=build_model(), args=args, callbacks=[timer],
                          train_dataset=TokenData(PER_RANK * dp_size * steps, SEQ, VOCAB))
        trainer.train()
        strategy = trainer.strategy
        step_peak = trainer.measure_step_memory(PER_RANK)
        predicted = _planned_peak(strategy_name, layout, checkpointing)
        held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)
        states = strategy.all_gather_object(held["bytes"] / 2**20)
        rss = strategy.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if strategy.is_main:
            Path(out).write_text(json.dumps({
                "layout": strategy.layout.describe(), "dp_size": dp_size,
                "samples_per_s": PER_RANK * dp_size / median_step_seconds(timer, WARMUP),
                "state_mib_per_rank": max(states), "peak_rss_mib": max(rss), "step_peak_mib": step_peak / 2**20,
                "planned_peak_mib": predicted / 2**20,
            }))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)  # see CPU notes: gloo threads may abort a normal interpreter exit


def plot(data: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["rows"])
    figure, (speed, state, peak) = plt.subplots(1, 3, figsize=(15, 3.8))
    speed.bar(range(len(names)), [data["rows"][n]["samples_per_s"] for n in names], color="tab:blue")
    speed.set_ylabel("samples/s (4 ranks)")
    state.bar(range(len(names)), [data["rows"][n]["state_mib_per_rank"] for n in names], color="tab:green")
    state.set_ylabel("model state MiB per rank")
    at = range(len(names))
    peak.bar([x - 0.2 for x in at], [data["rows"][n]["step_peak_mib"] for n in names], 0.4, label="measured")
    peak.bar([x + 0.2 for x in at], [data["rows"][n]["planned_peak_mib"] for n in names], 0.4, label="plan")
    peak.set_ylabel("step peak MiB per rank")
    peak.legend(fontsize=8)
    for axes in (speed, state, peak):
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    figure.suptitle(f"Parallel layouts on 4 ranks ({data['device']})", fontsize=10)
    return save_plot(figure, "parallelism-cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated subset of the layouts")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts, rest = parser.parse_known_args()
    if opts.worker:
        worker(opts.worker, opts.steps, rest[-1])
        return
    me = str(Path(__file__).resolve())
    rows = run_each(selected(LAYOUTS, opts.only), lambda name: [me, "--worker", name, "--steps", str(opts.steps)],
                    WORLD)
    device = cpu_device()
    first = next(iter(rows))  # flat FSDP, unless --only leaves it out
    fsdp = rows[first]["samples_per_s"]
    lines = [f"# Parallel layouts on {WORLD} ranks ({device}, torch {torch.__version__})", "",
             f"Llama-style, {LAYERS} layers, d={HIDDEN}, {HEADS} heads ({KV_HEADS} kv), vocab {VOCAB}, seq {SEQ}, "
             f"fp32, AdamW; {PER_RANK} rows per data-parallel rank; median step after {WARMUP} warm-up steps.",
             "Model state = parameters and optimizer state a rank holds between steps (its largest over ranks). "
             "Step peak = the most tensor bytes a rank holds during one micro-step (model state, gradients, "
             "activations, buffers; dispatch-mode accounting, the CPU analogue of CUDA's peak allocated memory), "
             "beside what `scaletrain plan`'s memory model predicts for the layout.", "",
             f"| layout | data-parallel ranks | samples/s | vs {first} | model state MiB/rank | step peak MiB/rank "
             "| plan predicts MiB | predicted / measured | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} ({r['layout']}) | {r['dp_size']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / fsdp:.2f}x | {r['state_mib_per_rank']:.1f} | {r['step_peak_mib']:.1f} | "
                     f"{r['planned_peak_mib']:.1f} | {r['planned_peak_mib'] / r['step_peak_mib']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    data = {"device": device, "torch": torch.__version__, "rows": rows}
    publish("parallelism-cpu", lines, data)
    plot(data)


if __name__ == "__main__":
    main()
