"""Where training is in its data, as a Stateful object the checkpoint manager saves and restores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .plan import BatchGeometry


@dataclass
class TrainProgress:
    """Saved as progress.json. The position is counted in this rank's micro-batches
    and, for a resume on another world size, in global samples."""

    geometry: BatchGeometry
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped on an fp16 overflow, over the whole run
    stream_state: Optional[dict] = None  # an iterable dataset's own position (its state_dict())
    middleware: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_in_epoch(self) -> int:
        return self.micro_batches_in_epoch * self.geometry.per_device * self.geometry.dp_size

    def advance(self, epoch: int, micro_batches_done: int) -> None:
        self.epoch, self.micro_batches_in_epoch = epoch, micro_batches_done
        self.global_step += 1

    def end_epoch(self, epoch: int) -> None:
        self.epoch, self.micro_batches_in_epoch = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "micro_batches_in_epoch": self.micro_batches_in_epoch,
            "global_step": self.global_step,
            "per_device_train_batch_size": self.geometry.per_device,
            "gradient_accumulation_steps": self.geometry.accumulation,
            "skipped_steps": self.skipped_steps, "middleware": self.middleware,
            # what a run on another world size needs to find the same place
            "samples_in_epoch": self.samples_in_epoch,
            "stream_state": self.stream_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position for this run's geometry: on another world size, or with another micro-batch,
        the same global samples are consumed, and this rank's share of them differs."""
        saved_world = state.get("world_size", self.geometry.dp_size)
        saved_micro_batch = state.get("per_device_train_batch_size", self.geometry.per_device)
        micro = int(state["micro_batches_in_epoch"])
        if saved_world != self.geometry.dp_size or saved_micro_batch != self.geometry.per_device:
            micro = int(state["samples_in_epoch"]) // (self.geometry.per_device * self.geometry.dp_size)
        self.epoch, self.micro_batches_in_epoch = int(state["epoch"]), micro
        self.global_step = int(state.get("global_step", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.stream_state = state.get("stream_state")
        self.middleware = dict(state.get("middleware") or {})
