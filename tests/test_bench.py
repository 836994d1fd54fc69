"""`scaletrain bench` under torchrun on 2 ranks: every configuration trains in the same processes, the table,
JSON and PNG land in output_dir, what sharding saves shows in the measured state, the estimate sits beside
it, and a configuration the launch cannot run is a row saying why. Bad options exit 2 before any launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

BIN = Path(sys.executable).parent


def test_bench_times_each_configuration_under_torchrun(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "scaletrain",
           "bench", "tiny-test", "--output_dir", str(tmp_path), "--strategies", "ddp,fsdp,single", "--micro-batch",
           "2", "--checkpointing", "both", "--steps", "5", "--warmup", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert sorted(rows) == ["ddp mb2", "ddp mb2+ckpt", "fsdp mb2", "fsdp mb2+ckpt", "single mb2", "single mb2+ckpt"]
    for name in ("ddp mb2", "ddp mb2+ckpt", "fsdp mb2", "fsdp mb2+ckpt"):
        row = rows[name]
        assert row["tokens_per_s"] > 0 and row["tflops_per_rank"] > 0 and row["step_s"] > 0, row
        # the estimate of the model state one rank holds is the measured one within a factor of 1.5
        assert 1 / 1.5 < row["estimate_state_gb_per_rank"] / row["state_gb_per_rank"] < 1.5, row
    assert rows["fsdp mb2"]["state_gb_per_rank"] < 0.7 * rows["ddp mb2"]["state_gb_per_rank"]  # sharded
    assert "WORLD_SIZE=2" in rows["single mb2"]["error"]  # refused, with the reason, and the others ran
    best = max((r for r in rows.values() if "error" not in r), key=lambda r: r["tokens_per_s"])
    assert f"fastest that ran: {best['config']}" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_bench_options_exit_2_before_any_launch(tmp_path):
    proc = subprocess.run([str(BIN / "scaletrain"), "bench", "tiny-test", "--output_dir", str(tmp_path),
                           "--micro-batch", "two"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--micro-batch 1,2,4" in proc.stderr, proc.stderr[-2000:]
