"""benchmarks/gpu.sh, the GPU benchmark, kept working on CPU: its --tiny path trains a tiny Llama under fsdp
(eager/compiled x with/without checkpointing) and writes the table, JSON and PNG; the script is shellcheck
clean. The full run needs a GPU (see README: Benchmarks)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SCALETRAIN_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--only", "fsdp", "--steps", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-cpu-tiny.json").read_text())
    assert result["device"] == "CPU"
    assert [r["config"] for r in result["rows"]] == ["fsdp", "fsdp+ckpt", "fsdp+compile", "fsdp+compile+ckpt"]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["peak_memory_gb"] > 0, row
    assert (tmp_path / "gpu-cpu-tiny.png").read_bytes()[:4] == b"\x89PNG"
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    lint = subprocess.run([shellcheck, "--shell=bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout
