"""Pipeline schedules on 2 ranks side by side: throughput and peak memory per rank of GPipe, 1F1B and
Interleaved1F1B (two stages per rank) at 2, 4 and 8 micro-batches a step, beside flat FSDP on the same two
ranks and the same global batch, with the bubble `scaletrain plan` predicts and its memory model.

Model: Llama-style, 8 layers, d=256, 4 heads (2 key/value), untied embeddings, vocab 8192, seq 256, fp32,
AdamW, 2 rows per micro-batch. Each setting runs in its own torchrun job through scaletrain's Trainer; the step
time is the median after a warm-up, and the last step is measured for memory (tensor bytes a rank holds at the
step's peak: dispatch-mode accounting, the CPU analogue of CUDA's peak allocated memory). A pipeline's ranks
wait (p - 1) of (m + p - 1) micro-batch slots (interleaved: (p - 1) of (v m + p - 1)), so throughput rises
with the micro-batch count m; GPipe keeps every micro-batch's activations until its backward, 1F1B at most p.

    python benchmarks/pipeline.py [--steps 6] [--only "1F1B m4,fsdp 2 m4"]
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

SEQ, VOCAB, LAYERS, HIDDEN, HEADS, KV_HEADS = 256, 8192, 8, 256, 4, 2
ROWS, WARMUP, WORLD = 2, 2, 2
MICRO_BATCHES = (2, 4, 8)
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")
SETTINGS = {f"{schedule} m{m}": (schedule, m) for m in MICRO_BATCHES for schedule in ("fsdp 2", *SCHEDULES)}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
                                        tie_word_embeddings=False))


def _layout(schedule: str, micro_batches: int) -> tuple[dict, int, int]:
    """(parallelism_config, rows per device per micro-batch, accumulation) for a global batch of ROWS x m."""
    if schedule == "fsdp 2":  # the same rows a step, split over two data-parallel ranks
        return {"dp_shard_size": 2}, ROWS, micro_batches // 2
    return {"pp_size": 2, "pp_schedule": schedule}, ROWS, micro_batches


def _planned(schedule: str, micro_batches: int) -> tuple[float, float]:
    """`scaletrain plan`'s bubble fraction and peak bytes per rank for this setting."""
    from scaletrain.performance.plan import Layout, PlanShape, predict_memory

    shape = PlanShape.of(build_model(), range(1, 2))
    if schedule == "fsdp 2":
        layout = Layout(1, 2, 1, ROWS, micro_batches // 2, False)
    else:
        per_rank = 2 if schedule == "Interleaved1F1B" else 1
        layout = Layout(1, 1, 1, ROWS, micro_batches, False, pp=2, schedule=schedule, stages_per_rank=per_rank)
    return layout.bubble if layout.pp > 1 else 0.0, sum(predict_memory(shape, layout, "fp32", SEQ).values())


def peak_of_last_step(device: torch.device, steps: int):
    """A TrainerCallback that measures the last step's peak tensor bytes (above what the step starts with)."""
    from transformers import TrainerCallback

    from scaletrain.performance.memory import PeakMemory

    class LastStepPeak(TrainerCallback):
        def __init__(self) -> None:
            self.meter, self.peak = None, None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == steps - 1:
                self.meter = PeakMemory(device).__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.meter is not None and self.peak is None:
                self.meter.__exit__(None, None, None)
                self.peak = self.meter.peak

    return LastStepPeak()


def worker(name: str, steps: int, out: str) -> None:
    from scaletrain import Trainer, TrainingArguments

    schedule, micro_batches = SETTINGS[name]
    layout, rows, accumulation = _layout(schedule, micro_batches)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=rows,
                                 gradient_accumulation_steps=accumulation, learning_rate=1e-4, save_strategy="no",
                                 logging_steps=steps, disable_tqdm=True, report_to="none", optim="adamw_torch",
                                 parallelism_config=layout)
        timer = step_timer()
        trainer = Trainer(model=build_model(), args=args, callbacks=[timer],
                          train_dataset=TokenData(ROWS * micro_batches * steps, SEQ, VOCAB))
        meter = peak_of_last_step(trainer.strategy.device, steps)
        trainer.add_callback(meter)
        trainer.train()
        strategy = trainer.strategy
        timer.times.pop()  # the measured step runs under the memory accounting: not timed
        held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)["bytes"]
        peaks = strategy.all_gather_object((held + meter.peak) / 2**20)
        bubble, planned = _planned(schedule, micro_batches)
        if strategy.is_main:
            Path(out).write_text(json.dumps({
                "describe": strategy.describe(), "micro_batches": micro_batches,
                "samples_per_s": ROWS * micro_batches / median_step_seconds(timer, WARMUP),
                "step_peak_mib": max(peaks), "planned_peak_mib": planned / 2**20, "planned_bubble": bubble,
            }))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)  # see CPU notes: gloo threads may abort a normal interpreter exit


def plot(data: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    figure, (speed, peak) = plt.subplots(1, 2, figsize=(12, 4))
    for number, schedule in enumerate(("fsdp 2", *SCHEDULES)):
        names = [n for n in rows if SETTINGS[n][0] == schedule]
        counts, color = [rows[n]["micro_batches"] for n in names], f"C{number}"
        speed.plot(counts, [rows[n]["samples_per_s"] for n in names], marker="o", color=color, label=schedule)
        peak.plot(counts, [rows[n]["step_peak_mib"] for n in names], marker="o", color=color,
                  label=f"{schedule} measured")
        peak.plot(counts, [rows[n]["planned_peak_mib"] for n in names], linestyle="--", color=color,
                  label=f"{schedule} plan")
    speed.set_ylabel("samples/s (2 ranks)")
    peak.set_ylabel("step peak MiB per rank")
    for axes in (speed, peak):
        axes.set_xlabel("micro-batches per step")
        axes.set_xticks(MICRO_BATCHES)
        axes.legend(fontsize=7)
    figure.suptitle(f"Pipeline schedules on 2 ranks ({data['device']})", fontsize=10)
    return save_plot(figure, "pipeline-cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SETTINGS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts, rest = parser.parse_known_args()
    if opts.worker:
        worker(opts.worker, opts.steps, rest[-1])
        return
    me = str(Path(__file__).resolve())
    rows = run_each(selected(SETTINGS, opts.only), lambda name: [me, "--worker", name, "--steps", str(opts.steps)],
                    WORLD)
    device = cpu_device()
    lines = [f"# Pipeline schedules on {WORLD} ranks ({device}, torch {torch.__version__})", "",
             f"Llama-style, {LAYERS} layers, d={HIDDEN}, {HEADS} heads ({KV_HEADS} kv), untied, vocab {VOCAB}, "
             f"seq {SEQ}, fp32, AdamW; {ROWS} rows per micro-batch, m micro-batches a step (flat FSDP: m/2 per "
             f"rank); median step after {WARMUP} warm-up steps. Step peak = tensor bytes a rank holds at the "
             "step's peak (model state, gradients, activations in flight, buffers), the most over ranks.", "",
             "| setting | layout | samples/s | vs fsdp 2, same m | plan's bubble | step peak MiB/rank | "
             "plan predicts MiB | predicted / measured |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        flat = rows.get(f"fsdp 2 m{r['micro_batches']}")
        versus = f"{r['samples_per_s'] / flat['samples_per_s']:.2f}x" if flat else "-"
        lines.append(f"| {name} | {r['describe']} | {r['samples_per_s']:.1f} | {versus} | "
                     f"{r['planned_bubble']:.0%} | {r['step_peak_mib']:.1f} | {r['planned_peak_mib']:.1f} | "
                     f"{r['planned_peak_mib'] / r['step_peak_mib']:.2f} |")
    data = {"device": device, "torch": torch.__version__, "rows": rows}
    publish("pipeline-cpu", lines, data)
    plot(data)


if __name__ == "__main__":
    main()
