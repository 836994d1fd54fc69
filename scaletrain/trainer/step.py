"""One optimizer step over a rank's micro-batches, without waiting for the device.

Loss weights, token counts and the step loss stay device tensors: reading any
of them on the host would stall the GPU pipeline once per micro-step. The log
window (metrics.py) reads them once per logging interval.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from ..modeling import label_shift
from ..optimizers.factory import current_lr, steps_on_metric
from ..parallel.pipeline_runtime import pipeline_of
from ..parallel.sequence_parallel import SequenceSplitter, split_rows

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's global mean loss (sums to it over ranks)
    samples: int
    tokens: torch.Tensor  # non-padding input tokens, int64 on the device
    grad_norm: Optional[Union[torch.Tensor, float]]  # None unless clipping is on
    stepped: bool  # False: skipped (fp16 overflow, or a NaN/inf loss with nonfinite_loss='skip')
    finite: torch.Tensor  # whether `loss` is finite (a device bool, computed once for the logs and totals)
    flos: float = 0.0  # estimated from input shapes (Trainer.floating_point_ops)
    model_flops: float = 0.0  # flos plus the attention term, for TFLOP/s and MFU (flops.py)


class LossWeighting:
    """Per-micro-batch weights that make a step's gradient the mean over every valid
    target of the global batch (all micro-batches, all ranks): k micro-batches of b
    rows give the gradient of one batch of k*b, ragged sequences included."""

    def __init__(self, strategy, label_names: list[str], model_source: Callable[[], torch.nn.Module]) -> None:
        self.strategy, self.label_names, self._model_source = strategy, label_names, model_source
        self._label_shift: Optional[int] = None

    @property
    def label_shift(self) -> int:
        """1 for a decoder-only causal LM (its loss skips each row's first label), else 0; found once."""
        if self._label_shift is None:
            self._label_shift = label_shift(self.strategy.unwrap(self._model_source()))
        return self._label_shift

    def count_items(self, inputs: dict[str, Any]) -> Optional[torch.Tensor]:
        """How many targets the model's mean loss averages over in this micro-batch,
        as a tensor where the labels are: counting must not wait for the device."""
        labels = inputs.get(self.label_names[0]) if len(self.label_names) == 1 else None
        if not isinstance(labels, torch.Tensor):
            return None
        if isinstance(inputs.get("shift_labels"), torch.Tensor):  # shifted already (over rows split by sp)
            return (inputs["shift_labels"] != IGNORE_INDEX).sum()
        if labels.is_floating_point():
            return torch.tensor(labels.numel(), device=labels.device)
        if self.label_shift and labels.dim() >= 2:
            labels = labels[..., self.label_shift:]
        return (labels != IGNORE_INDEX).sum()

    def global_items(self, micro_batches: list[dict[str, Any]]) -> Optional[torch.Tensor]:
        """The step's target count over all micro-batches and ranks (float64 on the device; a
        collective), or None without countable labels."""
        counts = [self.count_items(b) for b in micro_batches]
        if any(c is None for c in counts):
            return None
        # host-side counts reach the device without waiting for it (an async copy)
        counts = [c.to(self.strategy.device, torch.float64, non_blocking=True) for c in counts]
        return self.strategy.batch_all_reduce_sum(torch.stack(counts).sum().reshape(1))[0]

    def weight(self, inputs: dict[str, Any], global_items: Union[int, torch.Tensor]) -> torch.Tensor:
        """This micro-batch's share of the step: its targets over the global count, times the ranks the
        strategy averages gradients over (data-parallel replicas x sequence slices). With no target anywhere
        it is 0."""
        count = self.count_items(inputs)
        if count is None:
            raise ValueError(f"num_items_in_batch is given but the batch has no countable labels "
                             f"({self.label_names}); pass num_items_in_batch=None to average micro-batch means")
        count = count.to(self.strategy.device, torch.float64, non_blocking=True)
        total = torch.as_tensor(global_items, dtype=torch.float64, device=self.strategy.device)
        return count * self.strategy.layout.batch_ranks / total.clamp_min(1.0)


class StepRunner:
    """Forward/backward of each micro-batch (gradient sync on the last only), then
    clipping, the strategy's (precision-aware) step and the LR schedule. `hooks` is the
    Trainer: its training_step, floating_point_ops and callback events (`fire`)."""

    def __init__(self, hooks, weighting: LossWeighting, max_grad_norm: Optional[float]) -> None:
        self.hooks, self.strategy, self.weighting = hooks, hooks.strategy, weighting
        self.clip = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None
        self.splitter = sequence_splitter(self.strategy)
        self.skip_nonfinite = hooks.args.nonfinite_loss == "skip"
        self.learning_rate: Optional[float] = None  # of the last optimizer step, before the schedule moved on

    def _any_rank_nonfinite(self, finite: torch.Tensor) -> bool:
        """nonfinite_loss='skip': whether any rank's loss is NaN/inf (a collective and one host read per
        step, the policy's cost: the step must be decided before the optimizer moves)."""
        bad = torch.logical_not(finite).to(torch.float32).reshape(1)
        return bool(self.strategy.all_reduce_max(bad).item())

    def run(self, model, optimizer, scheduler, micro_batches: list[dict[str, Any]]) -> StepResult:
        # with sp, a row's sp ranks share it: the first counts its samples, tokens and FLOPs for all of them
        counted = micro_batches if self.strategy.layout.sp_rank == 0 else []
        loss = self._accumulate(model, micro_batches)
        samples = sum(batch_size(batch) for batch in counted)
        tokens = torch.zeros((), dtype=torch.int64, device=self.strategy.device)
        for batch in counted:
            tokens += token_count(batch)
        self.strategy.finish_backward(model)
        flos = float(sum(self.hooks.floating_point_ops(batch) for batch in counted))
        model_flops = flos + sum(self.hooks.attention_flops(batch) for batch in counted)
        finite = torch.isfinite(loss)
        ranks = self.strategy.layout.batch_ranks
        if self.skip_nonfinite and self._any_rank_nonfinite(finite):
            self.strategy.discard_gradients(model, optimizer)  # the weights, optimizer and schedule stay
            return StepResult(loss / ranks, samples, tokens, None, False, finite, flos, model_flops)
        self.strategy.unscale_gradients(optimizer)
        self.hooks.fire("on_pre_optimizer_step")
        grad_norm = self.strategy.clip_grad_norm_(model, self.clip) if self.clip is not None else None
        stepped = self.strategy.optimizer_step(optimizer)
        if self.clip is not None and grad_norm is None:
            grad_norm = self.strategy.reported_grad_norm(model)
        self.hooks.fire("on_optimizer_step")
        self.learning_rate = current_lr(scheduler, optimizer)  # the step's own rate, which HF logs
        if stepped and not steps_on_metric(scheduler):  # those step after an evaluation
            scheduler.step()
        # else an fp16 overflow: the weights did not move, so neither does the schedule
        self.strategy.zero_grad(optimizer)
        return StepResult(loss / ranks, samples, tokens, grad_norm, stepped, finite, flos, model_flops)

    def _accumulate(self, model, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """Forward and backward of every micro-batch (this rank's slice of each row with sp; through the
        pipeline schedule with pp); the summed loss."""
        pipeline = pipeline_of(self.strategy.unwrap(model))
        if pipeline is not None:
            return self._pipelined(pipeline, micro_batches)
        splits = [self.splitter.split(b) for b in micro_batches]
        global_items = self.weighting.global_items([inputs for inputs, _ in splits])
        self.hooks.current_gradient_accumulation_steps = len(micro_batches)
        loss = torch.zeros((), device=self.strategy.device)
        last = len(splits) - 1
        for i, (inputs, rows) in enumerate(splits):
            sync = contextlib.nullcontext() if i == last else self.strategy.no_sync(model)
            with sync, split_rows(rows):
                loss += self.hooks.training_step(model, inputs, global_items)
            if i != last:
                self.hooks.fire("on_substep_end")
        return loss.detach()


    def _pipelined(self, pipeline, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """The step's micro-batches through the pipeline's schedule, which syncs the data-parallel gradients
        itself after the last backward; the step's loss on every pp rank."""
        inputs = [self.hooks._prepare_inputs(b) for b in micro_batches]
        global_items = self.weighting.global_items(inputs)
        self.hooks.current_gradient_accumulation_steps = len(micro_batches)
        with self.hooks.compute_loss_context_manager():
            loss = pipeline.train_step(inputs, global_items, self.strategy.device)
        for _ in micro_batches[1:]:  # as many micro-step events as the step without a pipeline fires
            self.hooks.fire("on_substep_end")
        return loss


def sequence_splitter(strategy) -> SequenceSplitter:
    """What splits each micro-batch's rows over the layout's sp ranks (passes them through without sp)."""
    layout = strategy.layout
    group = layout.sp_mesh(strategy.device.type).get_group() if layout.sp > 1 else None
    return SequenceSplitter(group, layout.sp, layout.sp_rank)


def batch_size(batch: Any) -> int:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return 0


def token_count(batch: Any) -> Union[int, torch.Tensor]:
    """Non-padding input tokens (attention mask if present), without waiting for the device."""
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if isinstance(mask, torch.Tensor):
        return (mask != 0).sum()  # a float 0/1 mask counts as an integer one does
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
