"""The GPU benchmark: a ~1B Llama-style model (built from a config, random weights: no download) trained in
bf16 on one device for a few hundred steps of full-length synthetic token rows, under fsdp, ddp and zero3,
with and without torch.compile and activation checkpointing, and under fsdp with float8 matmuls (torchao,
with and without torch.compile, which float8 needs for its speed); on a host with 4 or more GPUs also the layouts
flat FSDP over 4, HSDP 2x2 and tp2 x FSDP2 on 4 GPUs (--layouts on|off|auto). Writes tokens/s, TFLOP/s, MFU
and peak memory with the device named to results/gpu-<device>.md/.json/.png.

    benchmarks/gpu.sh                      # on a GPU host: installs carried wheels, then runs this
    python benchmarks/gpu.py --tiny        # on CPU: a tiny Llama, a few steps (CI keeps this working)
    python benchmarks/gpu.py --tiny --only none --layouts on   # the layout rows on 4 CPU ranks

MFU is against the device's dense bf16 peak (scaletrain/trainer/flops.py), or --peak-tflops.
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
from strategies import (TokenData, median_step_seconds, publish, run_worker, save_plot,  # noqa: E402
                        step_timer)  # the shared launcher, data, step timing and output

# ~1.1B parameters (TinyLlama's shape); --tiny: a few hundred thousand
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
FLOAT8 = {"fsdp+float8": "fsdp"}  # row name -> the strategy it runs with float8=True
CONFIGS = ([(s, c, a) for s in ("fsdp", "ddp", "zero3") for c in (False, True) for a in (False, True)]
           + [("fsdp+float8", c, False) for c in (False, True)])
LAYOUT_GPUS = 4
LAYOUTS = {"fsdp 4": ("fsdp", {"dp_shard_size": 4}), "hsdp 2x2": ("fsdp", {"dp_replicate_size": 2, "dp_shard_size": 2}),
           "tp2 x fsdp2": ("fsdp", {"tp_size": 2, "dp_shard_size": 2})}


def build_llama(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))


def worker(opts) -> None:
    from scaletrain import Trainer, TrainingArguments

    strategy, compiled, checkpointing = opts.worker[0], opts.worker[1] == "1", opts.worker[2] == "1"
    float8 = strategy in FLOAT8
    strategy = FLOAT8.get(strategy, strategy)
    layout = None
    if strategy in LAYOUTS:
        strategy, layout = LAYOUTS[strategy]
    shape = LLAMA_TINY if opts.tiny else LLAMA_1B
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=opts.steps, per_device_train_batch_size=opts.micro_batch, learning_rate=1e-4,
            save_strategy="no", logging_steps=opts.steps, disable_tqdm=True, report_to="none", strategy=strategy,
            bf16=on_gpu, torch_compile=compiled, activation_checkpointing=checkpointing, parallelism_config=layout,
            peak_tflops=opts.peak_tflops, optim="adamw_torch_fused" if on_gpu else "adamw_torch", float8=float8)
        timer = step_timer()
        replicas = int(os.environ.get("WORLD_SIZE", "1")) // (layout or {}).get("tp_size", 1)
        rows = TokenData(replicas * opts.micro_batch * opts.steps, seq=opts.seq, vocab=shape["vocab_size"])
        trainer = Trainer(model=build_llama(shape), args=args, train_dataset=rows, callbacks=[timer])
        metrics = trainer.train().metrics
        warmup = max(2, opts.steps // 10)
        step = median_step_seconds(timer, warmup)
        scale = metrics["train_runtime"] / opts.steps / step  # whole-run rates -> steady-state step rates
        if not trainer.strategy.is_main:
            os._exit(0)
        Path(opts.out).write_text(json.dumps({
            "tokens_per_s": replicas * opts.micro_batch * opts.seq / step,  # over every GPU of the run
            "tflops": metrics["train_tflops_per_rank"] * scale, "mfu": metrics.get("train_mfu", 0.0) * scale or None,
            "peak_memory_gb": metrics["train_peak_memory_gb"]}))
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama and few steps (CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", default="", help="comma-separated strategies (fsdp,ddp,zero3,fsdp+float8; none: "
                                                   "no one-device rows)")
    parser.add_argument("--layouts", choices=("auto", "on", "off"), default="auto",
                        help=f"the {LAYOUT_GPUS}-GPU layout rows (auto: when the host has {LAYOUT_GPUS} GPUs)")
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.steps = opts.steps or (6 if opts.tiny else 200)
    opts.micro_batch = opts.micro_batch or (2 if opts.tiny else 4)
    opts.seq = opts.seq or (64 if opts.tiny else 2048)
    if opts.worker:
        worker(opts)
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = []
    for strategy, compiled, checkpointing in CONFIGS:
        if opts.only and strategy not in opts.only.split(","):
            continue
        label = strategy + ("+compile" if compiled else "") + ("+ckpt" if checkpointing else "")
        try:
            result = run_worker(_worker_argv(opts, strategy, compiled, checkpointing), 1)
        except RuntimeError as exc:  # e.g. zero3 + compile is refused, or out of memory: a row with why
            result = {"error": str(exc).strip().splitlines()[-1][:160]}
        rows.append({"config": label, **result})
        print(label, result, flush=True)
    rows += _layout_rows(opts)
    _publish(rows, device, opts)


def _worker_argv(opts, name: str, compiled: bool, checkpointing: bool) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", name, str(int(compiled)), str(int(checkpointing)),
            "--steps", str(opts.steps), "--micro-batch", str(opts.micro_batch), "--seq", str(opts.seq)]
    argv += ["--tiny"] if opts.tiny else []
    argv += ["--peak-tflops", str(opts.peak_tflops)] if opts.peak_tflops else []
    return argv + ["--out"]


def _layout_rows(opts) -> list[dict]:
    """Flat FSDP, HSDP and tp x FSDP on LAYOUT_GPUS ranks: tokens/s over all of them, per-GPU TFLOP/s."""
    gpus = torch.cuda.device_count()
    if opts.layouts == "off" or (opts.layouts == "auto" and gpus < LAYOUT_GPUS):
        reason = "--layouts off" if opts.layouts == "off" else f"this host has {gpus} GPU(s)"
        return [{"config": name, "error": f"needs {LAYOUT_GPUS} GPUs ({reason})"} for name in LAYOUTS]
    rows = []
    for name in LAYOUTS:
        try:
            result = run_worker(_worker_argv(opts, name, False, False), LAYOUT_GPUS)
        except RuntimeError as exc:
            result = {"error": str(exc).strip().splitlines()[-1][:160]}
        rows.append({"config": f"{name} ({LAYOUT_GPUS} GPUs)", **result})
        print(name, result, flush=True)
    return rows


def _publish(rows: list[dict], device: str, opts) -> None:
    name = "gpu-" + ("cpu-tiny" if opts.tiny else device.replace(" ", "-").lower())
    model = "tiny Llama" if opts.tiny else "Llama ~1.1B (TinyLlama's shape)"
    lines = [f"# {model} on one device: {device}", "",
             f"{'fp32' if device == 'CPU' else 'bf16'}, seq {opts.seq}, micro-batch {opts.micro_batch}, {opts.steps} "
             "steps, AdamW; median step after the warm-up tenth.", "",
             "| configuration | tokens/s | TFLOP/s | MFU % | peak memory GB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} | | | |")
        else:
            mfu = f"{r['mfu']:.1f}" if r.get("mfu") else "-"
            lines.append(f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | {mfu} | "
                         f"{r['peak_memory_gb']:.2f} |")
    publish(name, lines, {"device": device, "torch": torch.__version__, "seq": opts.seq,
                          "micro_batch": opts.micro_batch, "steps": opts.steps, "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "error" not in r]
    figure, axes = plt.subplots(figsize=(max(5, 0.8 * len(ran) + 2), 3.6))
    axes.bar(range(len(ran)), [r["tokens_per_s"] for r in ran])
    axes.set_xticks(range(len(ran)), [r["config"] for r in ran], rotation=30, ha="right")
    axes.set_ylabel("tokens/s")
    axes.set_title(f"{model}, {device}")
    save_plot(figure, name)


if __name__ == "__main__":
    main()
