"""Memory: activation checkpointing, per-rank peak per strategy vs the
estimator, and the batch finder vs an exhaustive search, in one table.

Model: GPT-2-style, 4 layers, d=256, vocab 8192, seq 256 (~5M parameters),
fp32, AdamW, the Trainer's defaults (the chunked loss turns on where
checkpointing leaves the logits the largest activation; its 1024-token chunk
is the whole micro-batch here, so it changes nothing). Every configuration
runs in its own processes (torchrun for 2 ranks) through scaletrain's Trainer.

How memory is measured (scaletrain/performance/memory.py):
- CPU: a TorchDispatchMode sees every tensor an operator creates (forward,
  backward, gradients) and a weak reference sees its storage die, so the
  peak is the most tensor bytes alive at once, as CUDA's
  max_memory_allocated reports. Allocator caching and library memory are not
  in it (RSS would show glibc's retained pages instead).
- CUDA (when run on a GPU): the caching allocator's own counters.
- "model state" is every live tensor storage at the optimizer step (after
  backward, before the update): parameters, gradients, optimizer state and
  backend buffers.
- "step peak" = state held before the micro-step + the peak of one forward
  and backward at the longest sequence + optimizer state to come
  (Trainer.measure_step_memory, what the batch finder uses).

    python benchmarks/memory.py
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
from strategies import TokenData, cpu_device, publish, run_worker  # noqa: E402  (one worker launcher and dataset for all benchmarks)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ, VOCAB, LAYERS, HIDDEN, HEADS = 256, 8192, 4, 256, 4
MICRO = 4
FINDER_RANGE = 16
STRATEGY_ROWS = [("single", 1), ("ddp", 2), ("fsdp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2)]
FINDER_ROWS = [("ddp", 2), ("fsdp", 2), ("zero3", 2)]


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB,
                                      n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _trainer(tmp: str, strategy_name: str, callbacks=None, **kw):
    from scaletrain import Trainer, TrainingArguments
    from scaletrain.strategies import build_strategy

    base = dict(output_dir=tmp, max_steps=2, per_device_train_batch_size=MICRO, learning_rate=1e-4,
                save_strategy="no", logging_steps=1, disable_tqdm=True, optim="adamw_torch", strategy=strategy_name)
    args = TrainingArguments(**{**base, **kw})
    strategy = build_strategy(args)
    strategy.setup_environment()
    model = strategy.build_model(build_model, build_model)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(256, SEQ, VOCAB), callbacks=callbacks,
                      strategy=strategy)
    return trainer, strategy


def _loss_chunk(args, shape):
    """The chunked loss's tokens per chunk where the run uses it (by default: where the logits dominate)."""
    from scaletrain.middleware.chunked_loss import planned_loss_chunk

    return planned_loss_chunk(args.chunked_loss, args.chunked_loss_tokens, shape, bool(args.activation_checkpointing),
                              "fp32")


def worker(kind: str, name: str, out: str) -> None:
    from transformers import TrainerCallback

    from scaletrain.performance.estimate import ModelShape, estimate
    from scaletrain.performance.memory import live_tensor_bytes

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "strategy":
            class Measure(TrainerCallback):
                def on_pre_optimizer_step(self, args, state, control, **kwargs):
                    if state.global_step == 1:
                        result["state"] = live_tensor_bytes(strategy.device, strategy.unwrap(trainer.model_wrapped))

            trainer, strategy = _trainer(tmp, name, callbacks=[Measure()])
            shape = ModelShape.of(strategy.unwrap(trainer.model))
            trainer.train()
            result["step_peak"] = trainer.measure_step_memory(MICRO)
            predicted = estimate(shape, name, strategy.world_size, "fp32", MICRO, SEQ,
                                 loss_chunk=_loss_chunk(trainer.args, shape))
            result.update(predicted_state=predicted.model_states, predicted_total=predicted.total,
                          world_size=strategy.world_size)
        elif kind == "activations":
            checkpointing = {"none": {}, "all": {"activation_checkpointing": True},
                             "every2": {"activation_checkpointing": True,
                                        "activation_checkpointing_kwargs": {"every_n_layers": 2}}}[name]
            trainer, strategy = _trainer(tmp, "single", **checkpointing)
            shape = ModelShape.of(trainer.model)
            trainer._setup_model()
            held = strategy.held_state_numel(trainer.model_wrapped, trainer.optimizer)["bytes"]
            from scaletrain.performance.memory import optimizer_state_bytes_to_come

            result["activations"] = trainer.measure_step_memory(MICRO) - held - optimizer_state_bytes_to_come(
                trainer.optimizer)
            every = {"none": 0, "every2": 2, "all": 1}[name]
            result["predicted"] = estimate(shape, "single", 1, "fp32", MICRO, SEQ, checkpointing=every,
                                           loss_chunk=_loss_chunk(trainer.args, shape)).activations
            result["world_size"] = 1
        else:  # finder
            probe, strategy = _trainer(tmp, name, per_device_train_batch_size=FINDER_RANGE)
            probe._setup_model()
            peaks = {b: probe.measure_step_memory(b) for b in range(1, FINDER_RANGE + 1)}
            budget = peaks[1] + int(0.55 * (peaks[FINDER_RANGE] - peaks[1]))
            true_max = max(b for b, peak in peaks.items() if peak <= budget)
            found, _ = _trainer(tmp + "/found", name, per_device_train_batch_size=FINDER_RANGE,
                                auto_find_batch_size=True, batch_finder_memory_budget=str(budget), max_steps=1)
            found.train()
            choice = found.batch_size_choice
            result.update(budget=budget, true_max=true_max, capacity=choice.capacity, probes=len(choice.probes),
                          per_device=choice.per_device, accumulation=choice.accumulation,
                          world_size=strategy.world_size)
        if strategy.is_main:
            Path(out).write_text(json.dumps(result))
        strategy.teardown()
    sys.stdout.flush()
    os._exit(0)


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(*opts.worker, opts.out)
        return
    me = str(Path(__file__).resolve())

    def run(kind: str, name: str, world: int) -> dict:
        result = run_worker([me, "--worker", kind, name, "--out"], world)
        print(kind, name, world, result, flush=True)
        return result

    activations = {name: run("activations", name, 1) for name in ("none", "every2", "all")}
    strategies = {name: run("strategy", name, world) for name, world in STRATEGY_ROWS}
    finder = {name: run("finder", name, world) for name, world in FINDER_ROWS}

    device = cpu_device()
    lines = [
        f"# Memory per rank ({device}, torch {torch.__version__})",
        "",
        f"GPT-2-style model, {LAYERS} layers, d={HIDDEN}, vocab {VOCAB}, seq {SEQ}, fp32, AdamW; micro-batch {MICRO}.",
        "Measured as tensor bytes (dispatch-mode accounting, the CPU analogue of CUDA max_memory_allocated);",
        "see the docstring of benchmarks/memory.py.",
        "",
        "## Activation checkpointing (1 process, one micro-step's forward+backward)",
        "",
        "| checkpointing | activations MiB (measured) | predicted MiB | vs none |",
        "|---|---:|---:|---:|",
    ]
    base = activations["none"]["activations"]
    for name, label in (("none", "off"), ("every2", "every 2nd block"), ("all", "every block")):
        r = activations[name]
        lines.append(f"| {label} | {mib(r['activations'])} | {mib(r['predicted'])} | {r['activations'] / base:.2f}x |")
    lines += [
        "",
        "## Per-rank memory by strategy vs `scaletrain estimate`",
        "",
        "| strategy | ranks | model state MiB | predicted | ratio | step peak MiB | predicted total | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, world), r in zip(STRATEGY_ROWS, strategies.values(), strict=True):
        lines.append(f"| {name} | {world} | {mib(r['state'])} | {mib(r['predicted_state'])} | "
                     f"{r['state'] / r['predicted_state']:.2f} | {mib(r['step_peak'])} | "
                     f"{mib(r['predicted_total'])} | {r['step_peak'] / r['predicted_total']:.2f} |")
    lines += [
        "",
        f"## Batch finder vs exhaustive search (per-rank batch {FINDER_RANGE}, budget 55% of the way from 1 to "
        f"{FINDER_RANGE} rows)",
        "",
        "| strategy | ranks | budget MiB | true max | found | probes | bound ⌈log2 range⌉+2 "
        "| chosen micro x accumulation |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    import math

    for (name, world), r in zip(FINDER_ROWS, finder.values(), strict=True):
        lines.append(f"| {name} | {world} | {mib(r['budget'])} | {r['true_max']} | {r['capacity']} | {r['probes']} | "
                     f"{math.ceil(math.log2(FINDER_RANGE)) + 2} | {r['per_device']} x {r['accumulation']} |")
    publish("memory-cpu", lines, {"device": device, "torch": torch.__version__, "activations": activations,
                                  "strategies": strategies, "finder": finder})
    from plots import plot_memory

    plot_memory({"device": device, "strategies": strategies})


if __name__ == "__main__":
    main()
