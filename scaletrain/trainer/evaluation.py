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
    """One rank's losses (as loss x targets, targets), predictions, labels and, with HF's
    include_for_metrics, per-sample losses and the main inputs. `keep=False` (batch_eval_metrics
    while evaluating) keeps only the losses: the metrics were computed batch by batch.
    `concat_batches=False` (HF's eval_do_concat_batches) returns lists of per-batch arrays."""

    def __init__(self, keep: bool = True, concat_batches: bool = True, include: tuple = ()) -> None:
        self.keep, self.concat_batches, self.include = keep, concat_batches, set(include)
        self.num_samples, self.batches = 0, 0
        self.losses: list[np.ndarray] = []
        self.parts: dict[str, list[Any]] = {"preds": [], "labels": [], "inputs": [], "sample_losses": []}

    def add(self, batch_size: int, loss: Optional[torch.Tensor], items: Optional[torch.Tensor], logits: Any,
            labels: Any, inputs: Any = None) -> None:
        self.num_samples += batch_size
        self.batches += 1
        if loss is not None:
            # the mean over all targets does not depend on how rows fell into batches or ranks
            weight = int(items) if items is not None else batch_size  # evaluation reads its loss anyway
            self.losses.append(np.array([[loss.item() * weight, weight]], dtype=np.float64))
        if not self.keep:
            return
        values = {"preds": logits, "labels": labels, "inputs": inputs if "inputs" in self.include else None,
                  "sample_losses": loss.repeat(batch_size) if loss is not None and "loss" in self.include else None}
        for name, value in values.items():
            if value is not None:
                self.parts[name].append(nested_numpify(value))

    def gather(self, strategy) -> tuple[int, Any, dict[str, Any]]:
        """(samples, losses, {preds, labels, inputs, sample_losses}) over all ranks, in dataset order."""
        local_parts = {k: concat(v) if self.concat_batches else (v or None) for k, v in self.parts.items()}
        gathered = strategy.dp_gather_object((self.num_samples, concat(self.losses), local_parts))
        merge = concat if self.concat_batches else _chain
        parts = {k: merge([g[2][k] for g in gathered]) for k in self.parts}
        return sum(g[0] for g in gathered), concat([g[1] for g in gathered]), parts


def _chain(batch_lists: list[Optional[list]]) -> Optional[list]:
    """eval_do_concat_batches=False: every rank's batches, one list in dataset order."""
    return [batch for batches in batch_lists if batches for batch in batches] or None


class BatchMetrics:
    """HF's batch_eval_metrics: compute_metrics(EvalPrediction(batch), compute_result=last) after
    every round of batches, each round gathered over ranks (as tensors, as HF passes them), so host
    memory holds one round's predictions instead of the whole set. Computed on the main process;
    the last call's result is shared."""

    def __init__(self, strategy, compute_metrics: Callable, include: tuple, rounds: int) -> None:
        self.strategy, self.compute_metrics, self.include = strategy, compute_metrics, set(include)
        self.rounds, self.done, self.result = rounds, 0, None

    def add(self, logits: Any, labels: Any, loss: Optional[torch.Tensor], inputs: Optional[dict],
            batch_size: int) -> None:
        part = None
        if logits is not None and labels is not None:
            part = {"predictions": _to_cpu(logits), "label_ids": _to_cpu(labels)}
            if "loss" in self.include and loss is not None:
                part["losses"] = loss.detach().cpu().repeat(batch_size)
            if "inputs" in self.include:
                part["inputs"] = {k: v.cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        self.join(part)

    def join(self, part: Optional[dict]) -> None:
        """One round: this rank's batch (None once its shard ran out); a collective."""
        self.done += 1
        parts = [p for p in self.strategy.dp_gather_object(part) if p is not None]
        last = self.done == self.rounds
        if parts and self.strategy.is_main:
            merged = {key: concat([p.get(key) for p in parts]) for key in parts[0]}
            self.result = self.compute_metrics(EvalPrediction(**merged), compute_result=last)
        if last:
            self.result = self.strategy.broadcast_object(self.result)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return type(value)(_to_cpu(v) for v in value)


def agreed_rounds(strategy, dataloader, always: bool = False) -> Optional[int]:
    """The most evaluation batches any rank has, where every forward is a collective
    (sharded parameters) or `always` (per-batch metrics): all ranks must agree before the
    first one. None otherwise."""
    if not (strategy.eval_needs_all_ranks or always):
        return None
    longest = torch.tensor([len(dataloader)], dtype=torch.int64, device=strategy.device)
    return int(strategy.all_reduce_max(longest).item())


def join_remaining_rounds(strategy, rounds: Optional[int], done: int, dataloader, predict: Callable[[dict], Any],
                          batch_metrics: Optional[BatchMetrics]) -> None:
    """This rank's shard ran out: keep joining the others' forwards (and their parameter
    all-gathers) with a filler batch, results discarded, and their per-batch metric rounds."""
    if rounds is None or rounds <= done:
        return
    filler = dataloader.collate_fn([dataloader.dataset[0]])
    for _ in range(rounds - done):
        if strategy.eval_needs_all_ranks:
            predict(filler)
        if batch_metrics is not None:
            batch_metrics.join(None)


def evaluation_metrics(strategy, compute_metrics: Optional[Callable], parts: dict[str, Any], losses: Any,
                       metric_key_prefix: str, batch_metrics: Optional[BatchMetrics] = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if batch_metrics is not None:
        metrics = dict(batch_metrics.result or {})
    elif compute_metrics is not None and parts["preds"] is not None and parts["labels"] is not None:
        computed = None
        if strategy.is_main:
            computed = compute_metrics(EvalPrediction(predictions=parts["preds"], label_ids=parts["labels"],
                                                      inputs=parts["inputs"], losses=parts["sample_losses"]))
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
