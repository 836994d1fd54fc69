"""The run plan: batch geometry, length and intervals of a training run, decided once.

Three things may change the configured batch geometry before the first step: a
resume on another world size (accumulation absorbs the change, the global batch
stays), a resume of a run whose batch finder chose a smaller micro-batch, and
the batch finder itself. Each produces a new `BatchGeometry`; nothing else in
the trainer multiplies batch sizes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# an IterableDataset has no epochs to count: the run is bounded by max_steps
UNBOUNDED_EPOCHS = 2**31 - 1
_DEFAULT_INTERVAL = 500  # the HF Trainer's logging_steps and save_steps default


@dataclass(frozen=True)
class BatchGeometry:
    per_device: int  # micro-batch rows per rank
    accumulation: int  # micro-batches per optimizer step
    dp_size: int  # data-parallel ranks, each reading its own rows (parallel/layout.py)

    @classmethod
    def configured(cls, args, dp_size: int) -> "BatchGeometry":
        return cls(args.per_device_train_batch_size, args.gradient_accumulation_steps, dp_size)

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.dp_size

    def with_micro_batch(self, per_device: int, accumulation: int) -> "BatchGeometry":
        return dataclasses.replace(self, per_device=per_device, accumulation=accumulation)

    def describe(self) -> str:
        return (f"{self.dp_size} data-parallel ranks x {self.per_device} per device x {self.accumulation} accumulation "
                f"= global batch {self.global_batch}")


@dataclass(frozen=True)
class RunPlan:
    geometry: BatchGeometry
    max_steps: int
    num_epochs: int
    micro_batches_per_epoch: Optional[int]  # None for an IterableDataset
    logging_steps: int
    save_steps: int
    eval_steps: int

    @property
    def per_device(self) -> int:
        return self.geometry.per_device

    @property
    def accumulation(self) -> int:
        return self.geometry.accumulation

    @property
    def updates_per_epoch(self) -> Optional[int]:
        """Optimizer steps in a full epoch (None for an IterableDataset)."""
        per_epoch = self.micro_batches_per_epoch
        return _updates_per_epoch(per_epoch, self.accumulation) if per_epoch else None

    def epoch_fraction(self, micro_batches_done: int) -> float:
        per_epoch = self.micro_batches_per_epoch
        return micro_batches_done / per_epoch if per_epoch else 0.0

    def epoch_is_over(self, micro_batches_done: int) -> bool:
        return self.micro_batches_per_epoch is not None and micro_batches_done >= self.micro_batches_per_epoch


def build_run_plan(args, geometry: BatchGeometry, micro_batches_per_epoch: Optional[int], rank: int) -> RunPlan:
    """`micro_batches_per_epoch`: this rank's training loader length (None if it has none)."""
    max_steps, num_epochs = _length(args, geometry, micro_batches_per_epoch, rank)
    logging_steps = interval(args.logging_steps, max_steps, _DEFAULT_INTERVAL)
    return RunPlan(
        geometry=geometry, max_steps=max_steps, num_epochs=num_epochs,
        micro_batches_per_epoch=micro_batches_per_epoch, logging_steps=logging_steps,
        save_steps=interval(args.save_steps, max_steps, _DEFAULT_INTERVAL),
        eval_steps=interval(args.eval_steps, max_steps, logging_steps),
    )


def _length(args, geometry: BatchGeometry, per_epoch: Optional[int], rank: int) -> tuple[int, int]:
    if per_epoch is None:
        if args.max_steps <= 0:
            raise ValueError("the training dataset has no length (IterableDataset): set max_steps")
        return args.max_steps, UNBOUNDED_EPOCHS
    if per_epoch == 0:
        raise ValueError(
            f"the training dataloader is empty on rank {rank} (dataset too small for "
            f"per_device_train_batch_size={geometry.per_device} with drop_last)"
        )
    updates_per_epoch = _updates_per_epoch(per_epoch, geometry.accumulation)
    if args.max_steps > 0:
        return args.max_steps, math.ceil(args.max_steps / updates_per_epoch)
    return math.ceil(args.num_train_epochs * updates_per_epoch), math.ceil(args.num_train_epochs)


def _updates_per_epoch(micro_batches: int, accumulation: int) -> int:
    """A short last group of micro-batches is a step too."""
    return max(math.ceil(micro_batches / accumulation), 1)


def interval(value: Optional[float], max_steps: int, fallback: int) -> int:
    """HF semantics: a value below 1 is a fraction of the run."""
    if value is None:
        return fallback
    return max(1, math.ceil(max_steps * value)) if value < 1 else int(value)
