"""What HF scripts ask TrainingArguments about the running process, and its set_* helpers (HF names and semantics).

HF's TrainingArguments starts the process group when a script first asks for
its device; here `main_process_first` starts it on first use, with the same
backend and timeout the strategy would use, so the data preprocessing HF's
example scripts run in it happens once per node (or run), before the Trainer exists.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist
from transformers.training_args import ParallelMode, trainer_log_levels
from transformers.training_args import TrainingArguments as HFTrainingArguments
from transformers.utils import logging as hf_logging

from ..parallel.environment import process_device, read_env, start_process_group

_HF_SETTERS = ("set_training", "set_evaluate", "set_testing", "set_save", "set_logging", "set_optimizer",
               "set_lr_scheduler", "set_dataloader", "set_push_to_hub")


class ProcessFacts:
    @property
    def world_size(self) -> int:
        return read_env().world_size

    @property
    def process_index(self) -> int:
        return read_env().rank

    @property
    def local_process_index(self) -> int:
        return read_env().local_rank

    @property
    def device(self) -> torch.device:
        return process_device(read_env(), self.use_cpu)

    @property
    def n_gpu(self) -> int:
        """GPUs this process uses: one rank drives one device (no DataParallel)."""
        return 1 if self.device.type == "cuda" else 0

    @property
    def parallel_mode(self) -> ParallelMode:
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def should_log(self) -> bool:
        """Whether this process logs: the main process, or each node's first with log_on_each_node."""
        return read_env().logs(self.log_on_each_node)

    @property
    def should_save(self) -> bool:
        """Whether this process writes files: the main process, or each node's first with save_on_each_node."""
        return read_env().writes_files(self.save_on_each_node)

    def get_process_log_level(self) -> int:
        """The log level for this process: log_level on the main one, log_level_replica elsewhere;
        'passive' keeps transformers' current verbosity."""
        chosen = trainer_log_levels[self.log_level if self.should_log else self.log_level_replica]
        return hf_logging.get_verbosity() if chosen == -1 else chosen

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """The main process (of each node with `local`) runs the block first; the others wait for it,
        then run it too (typically loading what the main one cached)."""
        env = read_env()
        if not env.is_distributed:
            yield
            return
        start_process_group(env, self.device, self.ddp_backend, self.ddp_timeout)
        is_main = (env.local_rank if local else env.rank) == 0
        try:
            if not is_main:
                dist.barrier()  # waits for the main process to finish `desc`
            yield
        finally:
            if is_main:
                dist.barrier()


def _checked_setter(name: str):
    hf_setter = getattr(HFTrainingArguments, name)

    @functools.wraps(hf_setter)
    def setter(self, *args, **kwargs):
        hf_setter(self, *args, **kwargs)
        self._recheck()  # what the setter changed is refused or honoured, like a field given at construction
        return self
    return setter


for _name in _HF_SETTERS:
    setattr(ProcessFacts, _name, _checked_setter(_name))
