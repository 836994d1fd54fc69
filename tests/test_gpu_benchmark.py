"""benchmarks/gpu.sh, the GPU benchmark, kept working on CPU: its --tiny path trains a tiny Llama under fsdp
(eager/compiled x with/without checkpointing) and writes the table, JSON and PNG; the script is shellcheck
clean. The full run needs a GPU (see docs/benchmarks.md); there the script runs the GPU tests first."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/gpu.py --tiny: a Llama of hidden 64, feed-forward 128, 2 layers, 4 heads of 16 with 2 key/value
# heads, vocab 512, untied head; one process, micro-batch 2 of 64 tokens (its defaults)
HIDDEN, FF, LAYERS, KV, VOCAB, SEQ = 64, 128, 2, 2 * 16, 512, 64
# non-embedding parameters (HF's count, the 6N of the FLOPs): q o, k v, gate up down, 2 RMSNorms per layer,
# the final norm and the untied lm_head
NON_EMBEDDING = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * FF + 2 * HIDDEN) + HIDDEN \
    + HIDDEN * VOCAB
FLOPS_PER_TOKEN = 6 * NON_EMBEDDING + 12 * LAYERS * HIDDEN * SEQ  # PaLM's attention term, fixed-length rows


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SCALETRAIN_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--only", "fsdp", "--steps", "4"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device: the GPU tests (make test-gpu) are skipped" in proc.stdout
    # the largest resident set of any process this test has run, the benchmark's workers included (waited for)
    largest_child_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30
    result = json.loads((tmp_path / "gpu-cpu-tiny.json").read_text())
    assert result["device"] == "CPU"
    ran = [r for r in result["rows"] if "error" not in r]
    assert [r["config"] for r in ran] == ["fsdp", "fsdp+ckpt", "fsdp+compile", "fsdp+compile+ckpt"]
    # the 4-GPU layout rows say why they did not run
    skipped = {r["config"]: r["error"] for r in result["rows"] if "error" in r}
    assert skipped == {name: "needs 4 GPUs (this host has 0 GPU(s))" for name in ("fsdp 4", "hsdp 2x2", "tp2 x fsdp2")}
    for row in ran:
        # TFLOP/s over tokens/s: the model FLOPs of a token, as counted by hand above (both rates are the
        # steady-state step's; the logged runtime is rounded to 0.1 ms)
        assert row["tflops"] * 1e12 / row["tokens_per_s"] == pytest.approx(FLOPS_PER_TOKEN, rel=2e-3), row
        assert row["mfu"] is None, row  # a CPU has no listed peak and none was given
        # a worker's peak RSS: more than an interpreter holding torch (~0.24 GB measured), at most the largest
        # child's as the kernel counted it (rounded to 1 MB)
        assert 0.1 <= row["peak_memory_gb"] <= largest_child_gb + 1e-3, (row, largest_child_gb)
    assert (tmp_path / "gpu-cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    lint = subprocess.run([shellcheck, "--shell=bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True,
                          text=True, check=False)
    assert lint.returncode == 0, lint.stdout
