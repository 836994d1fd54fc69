"""auto_find_batch_size on a CPU without batch_finder_memory_budget: HF's flag works as it does on a GPU,
sized against half of each rank's share of the host memory free at the start (read here from the
kernel independently of the code under test)."""
from __future__ import annotations

import pytest
import torch

from helpers import RaggedLM, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from scaletrain.trainer.batch_size import memory_budget


def _mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def test_the_default_cpu_budget_is_half_of_each_ranks_share_of_free_host_memory():
    args = TrainingArguments(output_dir="unused", auto_find_batch_size=True)
    for ranks in (1, 2, 4):
        budget = memory_budget(args, torch.device("cpu"), ranks)
        expected = _mem_available() / 2 / ranks  # no cgroup limit on this machine's test runs
        assert budget == pytest.approx(expected, rel=0.05), (ranks, budget, expected)
    explicit = TrainingArguments(output_dir="unused", auto_find_batch_size=True, batch_finder_memory_budget="3GiB")
    assert memory_budget(explicit, torch.device("cpu"), 2) == 3 * 2**30


def test_auto_find_batch_size_trains_on_cpu_without_a_budget(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), auto_find_batch_size=True, per_device_train_batch_size=8,
                             max_steps=2, save_strategy="no", disable_tqdm=True, report_to="none")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(32))
    trainer.train()
    choice = trainer.batch_size_choice
    # a tiny model fits the whole per-rank batch in gigabytes: the configured micro-batch is kept
    assert choice is not None and choice.per_device == 8 and choice.accumulation == 1
    assert trainer.state.global_step == 2
