"""Resuming with other batch settings, as HF's Trainer allows: the same global batch from another split
into micro-batches continues the run as if uninterrupted (the data position is kept in samples, the
gradient is the step's token-weighted mean either way); a changed global batch continues with a warning."""
from __future__ import annotations

import logging

import torch

from helpers import RaggedLM, tiny_gpt2
from scaletrain import Trainer, TrainingArguments

STEPS = 6


def _args(out, per_device: int, accumulation: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, max_steps=STEPS, save_steps=2,
                             learning_rate=0.5, optim="sgd", logging_steps=1, disable_tqdm=True,
                             report_to="none", seed=0)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_the_same_global_batch_in_smaller_micro_batches_resumes_as_if_uninterrupted(tmp_path):
    whole = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "whole", 4, 1), train_dataset=RaggedLM(64))
    whole.train()
    first = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "run", 4, 1), train_dataset=RaggedLM(64))
    first.train()
    resumed = Trainer(model=tiny_gpt2(seed=7), args=_args(tmp_path / "run", 2, 2), train_dataset=RaggedLM(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == STEPS
    reference = _weights(whole)
    # 2 x 2 rows per step against 4 x 1: the same rows and targets, float sums in another order (SGD: Adam
    # would turn the float noise on near-zero gradients into full-size steps)
    worst = max((reference[k] - v).abs().max().item() for k, v in _weights(resumed).items())
    assert worst < 1e-5, worst
    moved = max((reference[k] - v).abs().max().item() for k, v in tiny_gpt2().state_dict().items())
    assert moved > 1e-3  # the runs compared did train


def test_another_global_batch_continues_with_a_warning(tmp_path, caplog):
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "run", 4, 1), train_dataset=RaggedLM(64)).train()
    resumed = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "run", 8, 1), train_dataset=RaggedLM(64))
    with caplog.at_level(logging.WARNING, logger="scaletrain"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == STEPS
    assert any("= 8 per step (the checkpoint was trained with 4)" in r.getMessage() for r in caplog.records)
    # 2 steps of 4 rows were consumed before the checkpoint: the rest of the epoch is read in 8-row batches
    assert resumed.progress.epoch * 64 + resumed.progress.samples_in_epoch == 2 * 4 + (STEPS - 2) * 8
