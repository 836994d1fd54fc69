"""Samplers that shard data across ranks without losing or duplicating samples
where it matters, and that can start mid-epoch without replaying batches."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class ResumableShardedSampler(Sampler[int]):
    """Shuffled (or ordered, or length-grouped) indices for one rank, seeded per epoch.

    The epoch's order is cut into windows of W x b positions (W ranks, b = `batch_size` rows per micro-batch)
    and rank r takes the r-th block of b in each, as accelerate's batch sharding under HF's Trainer does: the
    global micro-batch at step s is the same set of samples whatever the world size (W ranks x b == one
    process x W*b), and each row meets the same rank's dropout stream as under HF, so a DDP checkpoint moves
    between the two trainers exactly. Like DistributedSampler, the order is padded by wrapping so every rank
    sees the same count (a last, partial window is split evenly); `start` skips samples already consumed this
    epoch by index arithmetic, not by iterating.

    `order`: "random" (a permutation seeded by seed + epoch), "sequential", or
    "group_by_length": HF's length grouping of that permutation, in groups of
    `group_size` (the global batch) rows of similar `lengths`, the longest first.
    Every order is a function of the epoch alone, so a resume lands exactly.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, drop_last: bool = False,
                 order: str = "random", lengths: Optional[list[int]] = None, group_size: int = 1,
                 batch_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError("the training dataset is empty")
        if order == "group_by_length" and (lengths is None or len(lengths) != num_samples):
            raise ValueError("group_by_length needs one length per sample")
        self.order, self.lengths, self.group_size = order, lengths, group_size
        self.num_samples_total = num_samples
        self.rank, self.world_size = rank, world_size
        self.seed, self.drop_last, self.batch_size = seed, drop_last, batch_size
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.per_rank = num_samples // world_size
        else:
            self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Begin this epoch at this rank's `start`-th sample (resume)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"sampler start={start} outside [0, {self.per_rank}]")
        self.start = start

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.order == "group_by_length":
            order = torch.tensor(get_length_grouped_indices(self.lengths, self.group_size, generator=g))
        elif self.order == "random":
            order = torch.randperm(self.num_samples_total, generator=g)
        else:
            order = torch.arange(self.num_samples_total)
        total = self.per_rank * self.world_size
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        return order[:total]

    def __iter__(self) -> Iterator[int]:
        mine = self._rank_share(self._epoch_order())
        start, self.start = self.start, 0  # a resume offset applies to one epoch only
        return iter(mine[start:].tolist())

    def _rank_share(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's block of every window; `order` holds per_rank x W positions."""
        window = self.world_size * self.batch_size
        full = len(order) // window * window
        blocks = order[:full].view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        tail = order[full:].view(self.world_size, -1)[self.rank]
        return torch.cat([blocks, tail])

    def __len__(self) -> int:
        return self.per_rank - self.start


class ContiguousShardSampler(Sampler[int]):
    """Rank r gets the r-th contiguous slice, no padding: every sample is seen
    exactly once across ranks and concatenating in rank order restores the
    dataset order (what distributed evaluate/predict need)."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.begin = num_samples * rank // world_size
        self.end = num_samples * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class ShardedIterable(IterableDataset):
    """Rank r's share of an IterableDataset: within every window of
    world_size * batch_size items it keeps positions r, r+W, ... An incomplete
    last window is dropped so that all ranks run out at the same step (a rank
    that stops early would hang the others in the next collective)."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int, batch_size: int) -> None:
        self.dataset, self.rank, self.world_size, self.batch_size = dataset, rank, world_size, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        window = self.world_size * self.batch_size
        buffer = []
        for item in self.dataset:
            buffer.append(item)
            if len(buffer) == window:
                yield from buffer[self.rank :: self.world_size]
                buffer = []
