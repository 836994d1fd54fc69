"""The batch finder's pre-flight in a run (the search itself: middleware/batch_finder.py)."""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

from torch.utils.data import IterableDataset

from ..rng import capture_rng_state, restore_rng_state
from ..data.samplers import ShardedIterable
from ..performance.memory import device_memory_capacity, format_bytes, host_memory_available, parse_bytes
from ..middleware.batch_finder import BatchSizeChoice, choose
from .plan import BatchGeometry

logger = logging.getLogger(__name__)
_DEVICE_MEMORY_SHARE = 0.9  # headroom for the allocator's fragmentation and communication buffers
# on a CPU the ranks of a node share the host memory that is free when training starts; half of each one's
# share leaves room for data loader workers, the page cache and what the measurement cannot see (a host
# out-of-memory kills the process instead of raising)
_HOST_MEMORY_SHARE = 0.5
_ROWS_SCANNED = 10_000  # of an iterable dataset, for its longest row


def find_batch_size(measure: Callable[[int], int], args, configured: BatchGeometry, device, local_ranks: int = 1
                    ) -> tuple[BatchSizeChoice, BatchGeometry]:
    """Measure real training micro-steps at the longest sequence, pick the
    micro-batch, keep the global batch. Leaves no trace in the RNG streams
    (`measure` drops its gradients)."""
    rng = capture_rng_state()
    try:
        choice = choose(measure, memory_budget(args, device, local_ranks), configured.per_device,
                        configured.accumulation)
    finally:
        restore_rng_state(rng)
    logger.info(choice.summary(configured.per_device, configured.accumulation, configured.dp_size))
    return choice, configured.with_micro_batch(choice.per_device, choice.accumulation)


def memory_budget(args, device, local_ranks: int = 1) -> int:
    """Bytes one rank may fill: batch_finder_memory_budget if set, else 90% of the accelerator's memory,
    or on a CPU half of this rank's share of the host memory free now (the same on every rank of a node
    up to timing: the finder follows the worst rank's measurement anyway)."""
    if args.batch_finder_memory_budget is not None:
        return parse_bytes(args.batch_finder_memory_budget, "batch_finder_memory_budget")
    capacity = device_memory_capacity(device)
    if capacity is None:
        budget = int(host_memory_available() * _HOST_MEMORY_SHARE / max(1, local_ranks))
        logger.info("batch finder: %s of host memory per rank (half of %d rank(s)' share of what is free; set "
                    "batch_finder_memory_budget to choose)", format_bytes(budget), local_ranks)
        return budget
    return int(capacity * _DEVICE_MEMORY_SHARE)


def longest_row(dataset) -> Any:
    """The training example with the longest sequence (the batch finder's
    worst case); iterable datasets are scanned over their first rows."""
    def length(row) -> int:
        values = row.values() if hasattr(row, "values") else [row]
        return max((len(v) for v in values if hasattr(v, "__len__") and not isinstance(v, str)), default=0)

    if isinstance(dataset, (IterableDataset, ShardedIterable)):
        rows = itertools.islice(iter(dataset), _ROWS_SCANNED)
    else:
        rows = (dataset[i] for i in range(len(dataset)))
    best, best_len = None, -1
    for row in rows:
        n = length(row)
        if n > best_len:
            best, best_len = row, n
    if best is None:
        raise ValueError("auto_find_batch_size needs a non-empty training dataset")
    return best
