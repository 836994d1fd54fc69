"""TFLOP/s and MFU in the logs: the model FLOPs of a known model (6 x non-embedding parameters plus the
attention term, per token) over the logged step time, and MFU against a given peak."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_llama
from scaletrain import Trainer, TrainingArguments

SEQ, ROWS = 24, 16


class FixedLength(torch.utils.data.Dataset):
    """Rows of one length: no padding, so every token the device computes is a token the logs count."""

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(1, 64, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _peak_rss_gb() -> float:
    """VmHWM: the most this process has held resident, in GB (Linux)."""
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kib * 1024 / 2**30


def _flops_per_token(model) -> float:
    """Independent of scaletrain: the parameters HF counts (embeddings excluded) and PaLM's attention term."""
    config = model.config
    return 6 * model.num_parameters(exclude_embeddings=True) + 12 * config.num_hidden_layers * config.hidden_size * SEQ


def test_logged_tflops_follow_the_formula_and_mfu_the_given_peak(tmp_path):
    model = tiny_llama()
    per_token = _flops_per_token(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, report_to="jsonl", peak_tflops=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=FixedLength())
    peak_before = _peak_rss_gb()
    trainer.train()
    peak_after = _peak_rss_gb()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4
    for row in steps:
        expected = per_token * row["train_tokens_per_second"] / 1e12  # one rank
        assert row["train_tflops_per_rank"] == pytest.approx(expected, rel=1e-6)
        assert row["train_mfu"] == pytest.approx(100 * row["train_tflops_per_rank"] / 0.5, rel=1e-9)
    summary = rows[-1]
    assert summary["train_tflops_per_rank"] == pytest.approx(per_token * summary["train_tokens_per_second"] / 1e12,
                                                             rel=1e-3)  # rates rounded to 3 decimals
    # this process's peak resident set (CPU) as the kernel reports it in /proc, before and after training:
    # the summary's value lies between them (it is rounded to 1 MB)
    assert peak_before - 1e-3 <= summary["train_peak_memory_gb"] <= peak_after + 1e-3, (peak_before, peak_after)
    # HF's total_flos stays HF's 6 x N x tokens estimate
    assert trainer.state.total_flos == 6 * model.num_parameters(exclude_embeddings=True) * SEQ * ROWS


def test_no_mfu_without_a_known_peak(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, report_to="none")
    model = tiny_llama()
    per_token = _flops_per_token(model)
    trainer = Trainer(model=model, args=args, train_dataset=FixedLength())
    metrics = trainer.train().metrics
    assert "train_mfu" not in metrics  # a CPU has no listed peak
    # the TFLOP/s are still reported: the formula over the summary's token rate (rounded to 3 decimals)
    assert metrics["train_tflops_per_rank"] == pytest.approx(per_token * metrics["train_tokens_per_second"] / 1e12,
                                                             rel=1e-3)
    with pytest.raises(ValueError, match="peak_tflops=0"):
        TrainingArguments(output_dir=str(tmp_path), peak_tflops=0)
