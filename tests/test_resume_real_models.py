"""Resume of the model families users fine-tune, and resume by name from the CLI.

HF sequence-classification models write `problem_type` into their config on the
first forward with labels, so a checkpoint's config never equals the config of
a freshly loaded copy of the same model. A resume must accept that model and
refuse another architecture, whether it differs in shapes or only in config
fields that shape the computation (attention heads).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port
from scaletrain import Trainer, TrainingArguments
from scaletrain.checkpoint import CheckpointError

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def tiny_bert_classifier(num_attention_heads: int = 2, num_hidden_layers: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=num_hidden_layers, intermediate_size=64,
                     num_attention_heads=num_attention_heads, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # resume must replay dropout
    return BertForSequenceClassification(cfg)


def classification_rows(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(1, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def classifier_args(out: Path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=2, logging_steps=1, strategy="single", seed=0,
                             disable_tqdm=True, optim="adamw_torch", learning_rate=1e-3)


def test_a_classifier_resumes_although_hf_set_problem_type_and_other_models_are_refused(tmp_path):
    full = Trainer(model=tiny_bert_classifier(), args=classifier_args(tmp_path, 4), train_dataset=classification_rows())
    full.train()
    saved_config = json.loads((tmp_path / "checkpoint-2" / "config.json").read_text())
    assert saved_config["problem_type"] == "single_label_classification"  # written by HF during training
    fresh = tiny_bert_classifier()
    assert fresh.config.problem_type is None

    resumed = Trainer(model=fresh, args=classifier_args(tmp_path / "resumed", 4), train_dataset=classification_rows())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name

    for other, expected in ((tiny_bert_classifier(num_attention_heads=4), r"num_attention_heads=2 there, 4 here"),
                            (tiny_bert_classifier(num_hidden_layers=1), r"parameters only in the checkpoint")):
        trainer = Trainer(model=other, args=classifier_args(tmp_path / "other", 4), train_dataset=classification_rows())
        with pytest.raises(CheckpointError, match=expected):
            trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ------------------------------------------------------------------- the CLI
def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "scaletrain", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# the demo's pretrained MiniLM under ddp, shortened: 8 steps of 2 x 8 questions
MINILM_DDP = [str(ROOT / "configs" / "ddp.yaml"), "--max_steps", "8", "--save_strategy", "steps", "--save_steps",
              "4", "--eval_strategy", "no", "--logging_steps", "2", "--per_device_train_batch_size", "8",
              "--save_total_limit", "none", "--data.train_size", "400", "--data.eval_size", "32", "--disable_tqdm",
              "true"]


def test_pretrained_minilm_resumes_bitwise_under_ddp_through_the_cli(tmp_path):
    check(torchrun([*MINILM_DDP, "--output_dir", str(tmp_path / "full")], tmp_path))
    saved = json.loads((tmp_path / "full" / "checkpoint-4" / "config.json").read_text())
    assert saved["problem_type"] == "single_label_classification"
    proc = check(torchrun([*MINILM_DDP, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                           str(tmp_path / "full" / "checkpoint-4")], tmp_path))
    assert "resumed from" in proc.stderr and "checkpoint-4 at step 4" in proc.stderr
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert full.keys() == resumed.keys() and len(full) > 100
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses("resumed") == {s: v for s, v in losses("full").items() if s > 4}


TINY = ["tiny-test", "--max_steps", "8", "--save_steps", "3"]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([str(BIN / "scaletrain"), "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)


def test_cli_resumes_from_latest_or_true_and_refuses_a_bad_target_before_launch(tmp_path):
    out = str(tmp_path / "run")
    empty = cli([*TINY, "--output_dir", out, "--resume_from_checkpoint", "latest"], tmp_path)
    assert empty.returncode == 2 and "holds no committed checkpoint" in empty.stderr
    assert "Traceback" not in empty.stderr
    check(cli([*TINY, "--max_steps", "6", "--output_dir", out], tmp_path))  # commits checkpoint-3 and -6
    for word in ("latest", "true"):
        proc = check(cli([*TINY, "--output_dir", out, "--resume_from_checkpoint", word], tmp_path))
        assert f"resumed from {out}/checkpoint-6 at step 6" in proc.stderr, word
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 8
        shutil.rmtree(Path(out) / "checkpoint-8")  # the newest again: checkpoint-6

    missing = str(tmp_path / "no-such-checkpoint")
    bad = torchrun([*TINY, "--output_dir", out, "--resume_from_checkpoint", missing], tmp_path, timeout=120)
    assert bad.returncode != 0
    assert f"resume_from_checkpoint={missing!r}: no such checkpoint folder" in bad.stderr
    # every rank left with the CLI's input-error code; the only traceback is torchrun's own report of that
    assert re.search(r"exitcode\s*:\s*2", bad.stderr), bad.stderr[-3000:]
    assert not re.search(r'File ".*scaletrain/', bad.stderr) and "init_process_group" not in bad.stderr
