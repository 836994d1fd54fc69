"""The SmolLM2 LoRA/QLoRA recipes for real: 2 processes under torchrun on the
real model and data, shortened. Slow (model conversion on first use, ~1 min
per run); `make test-all` runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", ["lora-smollm2", "qlora-smollm2"])
def test_recipe_runs_on_two_processes_and_lowers_the_held_out_loss(recipe, tmp_path):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "scaletrain",
           "train", str(ROOT / "configs" / f"{recipe}.yaml"), "--output_dir", str(out), "--max_steps", "6",
           "--save_steps", "6", "--data.train_size", "96", "--data.eval_size", "32", "--learning_rate", "1e-3"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] < summary["eval_loss_before"]
    assert summary["train_tokens_per_second"] > 0
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "adapter_config.json").is_file()
    assert json.loads((checkpoint / "manifest.json").read_text())["base_model"]
    assert "eval loss" in proc.stdout and "before ->" in proc.stdout
