"""The step path does not wait for the device.

On a GPU every `.item()`, `.cpu()`, `.tolist()` or `int(tensor)` of a device
tensor stalls the pipeline until the device catches up. This counts such calls
made directly by scaletrain's code during train() (torch's own, e.g. inside the
optimizer, are not ours to remove): they must not grow with micro-steps or
optimizer steps, and a logging window must cost exactly one.
"""
from __future__ import annotations

import collections
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import scaletrain
from helpers import RaggedLM, tiny_gpt2
from scaletrain import Trainer, TrainingArguments

PACKAGE = os.path.dirname(scaletrain.__file__)
HOST_READS = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors whose direct caller is scaletrain code, by file:line."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                self.calls[f"{os.path.relpath(caller.f_code.co_filename, PACKAGE)}:{caller.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def host_reads(tmp_path, accumulation: int, steps: int, logging_steps: int) -> collections.Counter:
    args = TrainingArguments(output_dir=str(tmp_path / f"{accumulation}-{steps}-{logging_steps}"), strategy="single",
                             per_device_train_batch_size=2, gradient_accumulation_steps=accumulation, max_steps=steps,
                             logging_steps=logging_steps, save_strategy="no", disable_tqdm=True, optim="adamw_torch")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(64))
    with HostReads() as reads:
        trainer.train()
    return reads.calls


def test_host_reads_do_not_grow_with_micro_steps_or_steps_and_a_log_window_costs_one(tmp_path):
    silent = host_reads(tmp_path, accumulation=1, steps=4, logging_steps=1000)  # logs only the summary
    assert host_reads(tmp_path, accumulation=4, steps=4, logging_steps=1000) == silent  # 4x the micro-steps
    assert host_reads(tmp_path, accumulation=4, steps=8, logging_steps=1000) == silent  # 2x the steps
    assert sum(silent.values()) <= 6, silent  # set-up and the summary, once per run
    for logging_steps in (1, 2):
        logged = host_reads(tmp_path, accumulation=4, steps=8, logging_steps=logging_steps)
        assert sum(logged.values()) - sum(silent.values()) == 8 // logging_steps, logged
