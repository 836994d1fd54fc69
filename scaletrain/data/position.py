"""Putting a training loader at a saved position, and reading a stream's position to save."""
from __future__ import annotations

import json
import logging
from typing import Optional

from torch.utils.data import DataLoader

from ..rng import capture_rng_state, restore_rng_state
from .loaders import stream_replay_reason, training_stream
from .samplers import ResumableShardedSampler

logger = logging.getLogger(__name__)


def position_epoch(loader: DataLoader, epoch: int, skip_micro: int, saved_stream_state: Optional[dict]) -> int:
    """Position the loader `skip_micro` micro-batches into `epoch`; returns how
    many micro-batches must still be drawn and dropped (0 unless a stream
    cannot restore its saved position)."""
    sampler = loader.sampler
    if isinstance(sampler, ResumableShardedSampler):
        sampler.set_epoch(epoch)
        if skip_micro:
            sampler.set_start(min(skip_micro * loader.batch_size, sampler.per_rank))
        return 0
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if not skip_micro:
        return 0
    reason = stream_replay_reason(loader)
    if reason is None and saved_stream_state is not None:
        training_stream(loader).load_state_dict(saved_stream_state)
        return 0
    reason = reason or "the checkpoint holds no stream position"
    logger.warning("resuming mid-stream by replaying %d micro-batches: %s", skip_micro, reason)
    return skip_micro


def stream_state(loader: Optional[DataLoader], micro_done: int) -> Optional[dict]:
    """A training stream's position (its state_dict()) when a resume can restore
    it; the same on every rank, as every rank reads the whole stream."""
    stream = training_stream(loader) if loader is not None else None
    if stream is None or not micro_done or stream_replay_reason(loader) is not None:
        return None
    state = stream.state_dict()
    try:
        json.dumps(state)
    except (TypeError, ValueError):
        logger.warning("the training stream's state_dict() is not JSON data; a resume will replay batches")
        return None
    return state


def iter_keeping_rng(loader: DataLoader):
    """The loader's iterator, created without drawing from the global RNG.
    torch's DataLoader draws a base seed from it whenever an iterator is made;
    a run resumed mid-epoch makes that epoch's iterator after the checkpoint's
    RNG state (taken after the draw) is restored, so a second draw would shift
    every later dropout mask against the uninterrupted run."""
    state = capture_rng_state()
    batches = iter(loader)
    restore_rng_state(state)
    return batches
