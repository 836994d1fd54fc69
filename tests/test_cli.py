"""The CLI for real under the launchers users run, and W&B offline logging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wandb_reader import read_wandb_history

BIN = Path(sys.executable).parent


def run(cmd: list[str], tmp_path: Path, extra_env: dict | None = None, timeout: int = 180):
    """Run cmd; extra_env values of None remove the variable."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_cli_runs_a_zero_stage_in_one_process_without_a_launcher(tmp_path):
    out = tmp_path / "run"
    run([str(BIN / "scaletrain"), "train", "tiny-test", "--output_dir", str(out), "--strategy", "zero2"], tmp_path,
        extra_env={k: None for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "zero2 (world size 1, device cpu)"
    assert (out / "checkpoint-6" / "COMMITTED").is_file()


def test_cli_rejects_bad_config_before_starting(tmp_path):
    proc = subprocess.run([str(BIN / "scaletrain"), "train", "tiny-test", "--per_device_train_batch_size", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "per_device_train_batch_size=0 must be >= 1" in proc.stderr


def test_wandb_offline_history_matches_jsonl(tmp_path):
    out = tmp_path / "run"
    run([str(BIN / "scaletrain"), "train", "tiny-test", "--output_dir", str(out), "--report_to", "wandb",
         "--run_name", "tiny", "--project", "field-check-project"], tmp_path,
        extra_env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_API_KEY": "x" * 40})
    run_files = list((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    assert b"field-check-project" in run_files[0].read_bytes()  # TrainingArguments.project names the W&B project
    history = read_wandb_history(str(run_files[0]))
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every training-loss and eval-loss point appears in W&B with the same step and value
    for key in ("loss", "eval_loss"):
        logged = {r["step"]: r[key] for r in jsonl if key in r}
        seen = {h["_step"]: h[key] for h in history if key in h}
        assert logged and seen == pytest.approx(logged, rel=1e-6), key
    # the API key is never written into the run
    for path in (tmp_path / "wb").rglob("*"):
        if path.is_file():
            assert b"x" * 40 not in path.read_bytes(), path


def test_export_refuses_an_uncommitted_checkpoint(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    proc = subprocess.run([str(BIN / "scaletrain"), "export", str(tmp_path / "checkpoint-3"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "has no COMMITTED marker" in proc.stderr and not (tmp_path / "out").exists()


# tiny-test's model as `scaletrain estimate` builds it from the model config: MiniLM's BERT (vocab 30,522,
# 512 positions) cut to 1 layer of hidden 32, feed-forward 64, and HF's default head of 2 labels
_H, _FF, _LABELS = 32, 64, 2
_EMBEDDINGS = (30522 + 512 + 2) * _H + 2 * _H  # word, position, token-type tables + their LayerNorm
_LAYER = 4 * (_H * _H + _H) + (_H * _FF + _FF) + (_FF * _H + _H) + 2 * 2 * _H  # q k v o, feed-forward, 2 LayerNorms
TINY_TEST_PARAMETERS = _EMBEDDINGS + _LAYER + (_H * _H + _H) + (_H + 1) * _LABELS  # + pooler, classifier


def _bytes(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def test_estimate_prints_every_strategy_for_a_world_size_this_machine_cannot_run(tmp_path):
    proc = run([str(BIN / "scaletrain"), "estimate", "tiny-test", "--world-size", "64", "--bf16", "true",
                "--activation_checkpointing", "true"], tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| strategy")}
    assert {"ddp", "fsdp", "zero1", "zero2", "zero3"} <= set(rows)
    assert f"{TINY_TEST_PARAMETERS:,} trainable parameters" in proc.stdout
    assert "activation checkpointing on" in proc.stdout
    psi = TINY_TEST_PARAMETERS
    # the ZeRO paper's model states per rank with Adam: ZeRO-3 partitions bf16 parameters and gradients (2 bytes
    # each) and the fp32 master copy and both moments (4 + 8 bytes) over the 64 ranks; DDP keeps all of it,
    # its parameters in fp32 (autocast), the optimizer's two moments beside them
    expected = {"zero3": (2 * psi / 64, 2 * psi / 64, 12 * psi / 64), "ddp": (4 * psi, 4 * psi, 8 * psi)}
    for strategy, (parameters, gradients, optimizer) in expected.items():
        ranks, precision, *cells = rows[strategy]
        assert (ranks, precision) == ("64", "bf16"), rows[strategy]
        for printed, value in zip(cells[:3], (parameters, gradients, optimizer), strict=True):
            # printed to one decimal of its unit
            assert abs(_bytes(printed) - value) <= 0.05 * _bytes("1 " + printed.split()[1]), (strategy, printed, value)
