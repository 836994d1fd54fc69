"""`scaletrain bench` under torchrun on 2 ranks: every configuration trains in the same processes, the table,
JSON and PNG land in output_dir, what sharding saves shows in the measured state, the estimate sits beside
it, and a configuration the launch cannot run is a row saying why. Bad options exit 2 before any launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

BIN = Path(sys.executable).parent
# tiny-test's classifier: MiniLM's BERT cut to 1 layer of hidden 32 (feed-forward 64), TREC's 6 classes; its
# non-embedding parameters by hand (what 6 x N counts, as HF's floating_point_ops does)
H, FF, LAYERS, LABELS, MAX_LENGTH = 32, 64, 1, 6, 32
NON_EMBEDDING = (4 * (H * H + H) + (H * FF + FF) + (FF * H + H) + 2 * 2 * H) * LAYERS + 2 * H + (H * H + H) \
    + (H + 1) * LABELS  # q k v o, feed-forward, LayerNorms; embedding LayerNorm; pooler; classifier
RANKS, MICRO_BATCH = 2, 1  # one row per rank and step: nothing is padded, so every computed token is counted
SHORTEST = 3  # [CLS] word [SEP]


def test_bench_times_each_configuration_under_torchrun(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(RANKS), "--master_port", str(free_port()), "-m",
           "scaletrain", "bench", "tiny-test", "--output_dir", str(tmp_path), "--strategies", "ddp,fsdp,single",
           "--micro-batch", str(MICRO_BATCH), "--checkpointing", "both", "--steps", "5", "--warmup", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert sorted(rows) == ["ddp mb1", "ddp mb1+ckpt", "fsdp mb1", "fsdp mb1+ckpt", "single mb1", "single mb1+ckpt"]
    ran = ("ddp mb1", "ddp mb1+ckpt", "fsdp mb1", "fsdp mb1+ckpt")
    per_step, per_token = {}, {}
    for name in ran:
        row = rows[name]
        # tokens/s x seconds/step: the tokens of a step, 2 rows of 3 to 32 tokens
        per_step[name] = row["tokens_per_s"] * row["step_s"]
        assert RANKS * MICRO_BATCH * SHORTEST <= per_step[name] <= RANKS * MICRO_BATCH * MAX_LENGTH, row
        # FLOPs per rank per token: (6 N + 12 x layers x hidden x the row's length) / ranks (PaLM's count)
        per_token[name] = row["tflops_per_rank"] * 1e12 / row["tokens_per_s"]
        low, high = (6 * NON_EMBEDDING + 12 * LAYERS * H * length for length in (SHORTEST, MAX_LENGTH))
        assert low / RANKS <= per_token[name] <= high / RANKS, (name, per_token[name], low, high)
        # the estimate of the model state one rank holds is the measured one within a factor of 1.5
        assert 1 / 1.5 < row["estimate_state_gb_per_rank"] / row["state_gb_per_rank"] < 1.5, row
    # every configuration trains the same rows in the same order: the same tokens per step and FLOPs per token
    # (the logged rates are rounded to 3 decimals and the runtime to 0.1 ms: 2e-3 and 1e-5 cover that)
    for name in ran:
        assert per_step[name] == pytest.approx(per_step["ddp mb1"], rel=2e-3), per_step
        assert per_token[name] == pytest.approx(per_token["ddp mb1"], rel=1e-5), per_token
    assert rows["fsdp mb1"]["state_gb_per_rank"] < 0.7 * rows["ddp mb1"]["state_gb_per_rank"]  # sharded
    assert "WORLD_SIZE=2" in rows["single mb1"]["error"]  # refused, with the reason, and the others ran
    best = max((r for r in rows.values() if "error" not in r), key=lambda r: r["tokens_per_s"])
    assert f"fastest that ran: {best['config']}" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_bench_options_exit_2_before_any_launch(tmp_path):
    proc = subprocess.run([str(BIN / "scaletrain"), "bench", "tiny-test", "--output_dir", str(tmp_path),
                           "--micro-batch", "two"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--micro-batch 1,2,4" in proc.stderr, proc.stderr[-2000:]
