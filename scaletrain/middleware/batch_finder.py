"""Automatic batch size: a pre-flight search for the largest per-device
micro-batch whose training step fits a memory budget.

Why a pre-flight and not "catch the OOM and halve" (HF's auto_find_batch_size):
under FSDP or ZeRO-3 an OOM on one rank leaves the others waiting in a
collective forever, and on CPU an overcommitted process is killed, not raised.
So the finder measures instead of failing: every probe is a real forward and
backward at the longest sequence length of the training set, its peak memory
is measured (scaletrain.performance.memory) and the maximum over ranks decides, so all
ranks take the same path. Probes are chosen from a linear model of memory in
the batch size (peak = fixed + per-row x rows, which is what a transformer's
activations are), so no probe is expected to exceed the budget: growth stops
at the predicted maximum and bisection stays between a size that fitted and
one that measured over budget.

The configured global batch (per-device x accumulation x world size) is kept:
the chosen micro-batch divides the per-rank batch and accumulation takes the
rest. Gradients of the probes are discarded and the RNG restored, so training
afterwards is identical to a run configured with the chosen sizes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable


from ..performance.memory import format_bytes, parse_bytes

logger = logging.getLogger(__name__)

# stop when the largest fitting size is within this fraction of the smallest
# failing one: the answer is then within 5% of the true maximum
_RESOLUTION = 0.05


def check_options(args) -> None:
    if args.batch_finder_memory_budget is not None:
        if not args.auto_find_batch_size:
            raise ValueError(f"batch_finder_memory_budget={args.batch_finder_memory_budget!r} is set but "
                             "auto_find_batch_size is False; set auto_find_batch_size: true or drop the budget")
        parse_bytes(args.batch_finder_memory_budget, "batch_finder_memory_budget")


class BatchSizeError(RuntimeError):
    pass


@dataclass
class BatchSizeChoice:
    capacity: int  # the largest micro-batch found to fit
    per_device: int  # chosen: the largest divisor of the per-rank batch <= capacity
    accumulation: int
    budget: int
    probes: list[tuple[int, int]] = field(default_factory=list)  # (micro-batch, peak bytes), in probe order

    def summary(self, configured_per_device: int, configured_accumulation: int, world_size: int) -> str:
        peaks = ", ".join(f"{b}:{format_bytes(m)}" for b, m in self.probes)
        return (f"batch finder: micro-batches up to {self.capacity} fit {format_bytes(self.budget)} per device; "
                f"per_device_train_batch_size {configured_per_device} -> {self.per_device}, "
                f"gradient_accumulation_steps {configured_accumulation} -> {self.accumulation} (global batch "
                f"{self.per_device * self.accumulation * world_size} kept); {len(self.probes)} probes "
                f"(micro-batch:peak) {peaks}")


def search_capacity(measure: Callable[[int], int], budget: int, upper: int) -> tuple[int, list[tuple[int, int]]]:
    """The largest b in [1, upper] with measure(b) <= budget, assuming memory
    grows with b. Returns (b, probes). Grows along the linear prediction, then
    bisects between the largest fitting and the smallest failing size."""
    probes: list[tuple[int, int]] = []
    cache: dict[int, int] = {}

    def probe(b: int) -> bool:
        if b not in cache:
            cache[b] = measure(b)
            probes.append((b, cache[b]))
        return cache[b] <= budget

    if not probe(1):
        raise BatchSizeError(
            f"a micro-batch of 1 already needs {format_bytes(cache[1])} per device, over the budget of "
            f"{format_bytes(budget)}; raise batch_finder_memory_budget, or save memory with bf16, "
            "activation_checkpointing or a sharded strategy (fsdp, zero3)")
    lo, hi = 1, upper + 1  # lo fits; hi is the smallest known not to fit (upper + 1: none known)
    # grow: aim at the predicted largest fitting size, one row more at least when the prediction undershoots
    while lo < upper and hi == upper + 1:
        guess = min(upper, max(lo + 1, _predict(cache, budget, lo)))
        if probe(guess):
            lo = guess
        else:
            hi = guess
    # bisect, until lo is within the resolution of the boundary. The secant
    # through lo and hi aims well on a near-linear curve but can creep up one
    # side of a curved one; after two probes on the same side, halve instead.
    sides: list[bool] = []
    while hi - lo > 1 and (hi - 1) > lo * (1 + _RESOLUTION):
        predicted = _predict(cache, budget, lo)
        creeping = len(sides) >= 2 and sides[-1] == sides[-2]
        mid = predicted if lo < predicted < hi and not creeping else (lo + hi) // 2
        # never spend a probe on a size within the resolution of lo
        mid = min(hi - 1, max(mid, lo + max(1, math.ceil(lo * _RESOLUTION))))
        fits = probe(mid)
        sides.append(fits)
        if fits:
            lo = mid
        else:
            hi = mid
    return lo, probes


def _predict(cache: dict[int, int], budget: int, lo: int) -> int:
    """Largest b the line through the two largest fitting probes (or the
    fitting probe and the failing one nearest it) says fits the budget."""
    sizes = sorted(cache)
    below = [b for b in sizes if b <= lo]
    above = [b for b in sizes if b > lo]
    pair = below[-2:] if len(below) >= 2 and not above else ([below[-1], above[0]] if above else below[-2:])
    if len(pair) < 2:
        return 2 * lo
    (b0, b1), (m0, m1) = pair, (cache[pair[0]], cache[pair[1]])
    slope = (m1 - m0) / (b1 - b0)
    if slope <= 0:
        return 2 * lo
    return int(b0 + (budget - m0) / slope)


def choose(measure: Callable[[int], int], budget: int, per_device: int, accumulation: int) -> BatchSizeChoice:
    per_rank = per_device * accumulation
    capacity, probes = search_capacity(measure, budget, per_rank)
    chosen = max(d for d in range(1, min(capacity, per_rank) + 1) if per_rank % d == 0)
    return BatchSizeChoice(capacity=capacity, per_device=chosen, accumulation=per_rank // chosen, budget=budget,
                           probes=probes)
