"""Sharded evaluation: each rank evaluates its contiguous shard, results are gathered in
dataset order (every sample exactly once), metrics are computed once and shared."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import EvalPrediction

from .step import IGNORE_INDEX


class EvalResults:
    """One rank's losses (as loss x targets, targets), predictions and labels."""

    def __init__(self) -> None:
        self.num_samples, self.batches = 0, 0
        self.losses: list[np.ndarray] = []
        self.preds: list[Any] = []
        self.labels: list[Any] = []

    def add(self, batch_size: int, loss: Optional[torch.Tensor], items: Optional[torch.Tensor], logits: Any,
            labels: Any) -> None:
        self.num_samples += batch_size
        self.batches += 1
        if loss is not None:
            # the mean over all targets does not depend on how rows fell into batches or ranks
            weight = int(items) if items is not None else batch_size  # evaluation reads its loss anyway
            self.losses.append(np.array([[loss.item() * weight, weight]], dtype=np.float64))
        if logits is not None:
            self.preds.append(nested_numpify(logits))
        if labels is not None:
            self.labels.append(nested_numpify(labels))

    def gather(self, strategy) -> tuple[int, Any, Any, Any]:
        """(samples, losses, predictions, labels) over all ranks, in dataset order."""
        local = (self.num_samples, concat(self.losses), concat(self.preds), concat(self.labels))
        gathered = strategy.all_gather_object(local)
        return (sum(g[0] for g in gathered), *(concat([g[i] for g in gathered]) for i in (1, 2, 3)))


def agreed_rounds(strategy, dataloader) -> Optional[int]:
    """The most evaluation batches any rank has, where every forward is a collective
    (sharded parameters): all ranks must agree before the first one. None otherwise."""
    if not strategy.eval_needs_all_ranks:
        return None
    longest = torch.tensor([len(dataloader)], dtype=torch.int64, device=strategy.device)
    return int(strategy.all_reduce_max(longest).item())


def join_remaining_rounds(rounds: Optional[int], done: int, dataloader, predict: Callable[[dict], Any]) -> None:
    """This rank's shard ran out: keep joining the others' forwards (and their
    parameter all-gathers) with a filler batch, results discarded."""
    if rounds is None or rounds <= done:
        return
    filler = dataloader.collate_fn([dataloader.dataset[0]])
    for _ in range(rounds - done):
        predict(filler)


def evaluation_metrics(strategy, compute_metrics: Optional[Callable], preds: Any, labels: Any, losses: Any,
                       metric_key_prefix: str) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if compute_metrics is not None and preds is not None and labels is not None:
        computed = None
        if strategy.is_main:
            computed = compute_metrics(EvalPrediction(predictions=preds, label_ids=labels))
        metrics = dict(strategy.broadcast_object(computed))  # one call, identical on every rank
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    if losses is not None:
        metrics["loss"] = float(losses[:, 0].sum() / max(losses[:, 1].sum(), 1.0))
    prefix = f"{metric_key_prefix}_"
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in metrics.items()}


class BestMetric:
    """metric_for_best_model tracking, in the TrainerState as the HF Trainer keeps it."""

    def __init__(self, name: Optional[str], greater_is_better: Optional[bool]) -> None:
        self.name = name
        self.key = None if name is None else (name if name.startswith("eval_") else f"eval_{name}")
        self.better = np.greater if greater_is_better else np.less

    def update(self, state, metrics: dict[str, float]) -> bool:
        """True if `metrics` hold a new best (recorded in `state`)."""
        if self.key is None:
            return False
        if self.key not in metrics:
            raise KeyError(
                f"metric_for_best_model={self.name!r}: {self.key!r} is not among the evaluation metrics "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.key])
        if state.best_metric is None or self.better(value, state.best_metric):
            state.best_metric = value
            state.best_global_step = state.global_step
            return True
        return False


def is_tensor_tree(value: Any) -> bool:
    """A tensor, or tuples/lists of them: what can be gathered as predictions
    (a KV cache object, or None, cannot)."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and len(value) > 0 and all(is_tensor_tree(v) for v in value)


def concat(parts: list[Any]) -> Any:
    """Concatenate along the batch axis, padding ragged sequence axes with -100."""
    out = None
    for part in parts:
        if part is not None:
            out = part if out is None else nested_concat(out, part, padding_index=IGNORE_INDEX)
    return out
