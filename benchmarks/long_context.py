"""The longest sequence a tiny Llama trains on 4 ranks within a fixed memory budget per rank, for Ulysses
sequence parallelism sp = 1, 2, 4 x the chunked loss x activation checkpointing.

Memory is the project's own accounting: the most tensor bytes a rank holds during one micro-step of one row
(Trainer.measure_step_memory: model state, gradients, optimizer state to come, activations, buffers; the CPU
analogue of CUDA's peak allocated memory). For each setting one torchrun job (FSDP2 over dp_shard x sp, every
rank one row) doubles the sequence length until a micro-step exceeds the budget, then bisects to a multiple
of 256 tokens. The model is Llama-shaped with a vocabulary (8k) large against its width, so the logits are the
largest activation, as they are for long-context fine-tuning of 128k-vocabulary models; the chunked loss runs
256 target positions per chunk. `scaletrain plan`'s
prediction for the longest length found is printed beside it.

Activation offload to host memory has no row here: on a CPU host the host memory is the device memory, so
there is nothing to measure (it is a GPU option).

    python benchmarks/long_context.py [--budget-mib 256] [--only "sp4 chunked checkpointed"]
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
from strategies import TokenData, cpu_device, publish, run_each, save_plot, selected  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, WORLD = 8192, 128, 2, 8, 4, 4
LOSS_CHUNK = 256  # chunked_loss_tokens: one chunk's logits are a fixed cost inside the budget
GRANULE, START = 256, 1024  # lengths are multiples of 256 (sp = 4 splits them evenly)
SETTINGS = {f"sp{sp}{' chunked' if chunked else ''}{' checkpointed' if checkpointed else ''}": (sp, chunked, ckpt)
            for sp in (1, 2, 4) for chunked in (False, True) for ckpt, checkpointed in ((False, False), (True, True))}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=KV_HEADS, max_position_embeddings=1 << 20,
                                        attn_implementation="sdpa"))


def _peak(trainer, length: int) -> float:
    """MiB the worst rank holds in a micro-step of one row of `length` tokens."""
    trainer.train_dataset, trainer._longest_example = TokenData(1, length, VOCAB), None
    return trainer.measure_step_memory(1) / 2**20


def longest_within(trainer, budget_mib: float) -> tuple[int, float]:
    """(the longest multiple of GRANULE whose micro-step fits the budget, its peak MiB); (0, peak) if none."""
    fits, fits_peak, length = 0, 0.0, START
    while True:  # doubling: the first length over the budget bounds the search
        peak = _peak(trainer, length)
        if peak > budget_mib:
            break
        fits, fits_peak, length = length, peak, length * 2
    low, high = fits, length
    while high - low > GRANULE:
        middle = (low + high) // 2 // GRANULE * GRANULE
        peak = _peak(trainer, middle)
        if peak <= budget_mib:
            low, fits_peak = middle, peak
        else:
            high = middle
    return low, fits_peak


def _planned_mib(sp: int, checkpointing: bool, chunked: bool, length: int) -> float:
    from scaletrain.performance.plan import Layout, PlanShape, predict_memory

    shape = PlanShape.of(build_model(), range(1, 2), _args("unused", sp, chunked, checkpointing))
    layout = Layout(1, WORLD // sp, 1, 1, 1, checkpointing, sp, sharded=True)
    return sum(predict_memory(shape, layout, "fp32", length).values()) / 2**20


def _args(out: str, sp: int, chunked: bool, checkpointing: bool):
    from scaletrain import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=1, optim="adamw_torch",
                             report_to="none", disable_tqdm=True, save_strategy="no", strategy="fsdp",
                             parallelism_config={"dp_shard_size": WORLD // sp, "sp_size": sp}, ddp_timeout=600,
                             chunked_loss=chunked, chunked_loss_tokens=LOSS_CHUNK,
                             activation_checkpointing=checkpointing)


def worker(name: str, budget_mib: float, out: str) -> None:
    from scaletrain import Trainer

    sp, chunked, checkpointing = SETTINGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=build_model(), args=_args(tmp, sp, chunked, checkpointing),
                          train_dataset=TokenData(1, START, VOCAB))
        trainer._setup_model()
        length, peak = longest_within(trainer, budget_mib)
        if trainer.strategy.is_main:
            Path(out).write_text(json.dumps({"sp": sp, "chunked_loss": chunked, "checkpointing": checkpointing,
                                             "longest": length, "peak_mib": peak,
                                             "planned_mib": _planned_mib(sp, checkpointing, chunked, length)}))
        trainer.strategy.teardown()
    sys.stdout.flush()
    os._exit(0)  # see CPU notes: gloo threads may abort a normal interpreter exit


def plot(data: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["rows"])
    figure, axes = plt.subplots(figsize=(9, 4))
    axes.bar(range(len(names)), [data["rows"][n]["longest"] for n in names], color="tab:purple")
    axes.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    axes.set_ylabel(f"longest sequence within {data['budget_mib']:g} MiB/rank")
    axes.set_yscale("log", base=2)
    figure.suptitle(f"Long context on {WORLD} ranks ({data['device']})", fontsize=10)
    return save_plot(figure, "long-context-cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-mib", type=float, default=256.0)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SETTINGS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts, rest = parser.parse_known_args()
    if opts.worker:
        worker(opts.worker, opts.budget_mib, rest[-1])
        return
    me = str(Path(__file__).resolve())
    rows = run_each(selected(SETTINGS, opts.only),
                    lambda name: [me, "--worker", name, "--budget-mib", str(opts.budget_mib)], WORLD)
    device = cpu_device()
    base = rows.get("sp1", next(iter(rows.values())))["longest"] or 1
    lines = [f"# Long context on {WORLD} ranks ({device}, torch {torch.__version__})", "",
             f"Llama-shaped: {LAYERS} layers, d={HIDDEN}, {HEADS} heads ({KV_HEADS} kv), vocab {VOCAB}; fp32, AdamW, "
             f"FSDP2 over dp_shard x sp, one row per data-parallel rank. Longest = the longest sequence (a multiple "
             f"of {GRANULE}) whose training micro-step holds at most {opts.budget_mib:g} MiB of tensors on every "
             "rank (the project's accounting: model state, gradients, optimizer state, activations, buffers).", "",
             "| setting | sp | chunked loss | checkpointing | longest tokens | vs sp1 | peak MiB at it "
             "| plan predicts MiB | predicted / measured |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sp']} | {'on' if r['chunked_loss'] else 'off'} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['longest']:,} | {r['longest'] / base:.1f}x | "
                     f"{r['peak_mib']:.1f} | {r['planned_mib']:.1f} | "
                     f"{r['planned_mib'] / max(r['peak_mib'], 1e-9):.2f} |")
    data = {"device": device, "torch": torch.__version__, "budget_mib": opts.budget_mib, "rows": rows}
    publish("long-context-cpu", lines, data)
    plot(data)


if __name__ == "__main__":
    main()
