"""Training logs: a window of steps accumulated on the device and read once per flush, and the run summary."""
from __future__ import annotations

import time
from typing import Optional, Union

import torch

from .flops import peak_memory_bytes, throughput_logs
from transformers.trainer_utils import TrainerMemoryTracker

from .step import StepResult


class LogWindow:
    """Loss, sample and token sums since the last log, as device tensors. Time spent
    evaluating or saving is excluded from the throughput (see `pause`)."""

    def __init__(self, strategy, nan_inf_filter: bool, peak_tflops: Optional[float] = None) -> None:
        self.strategy, self.nan_inf_filter, self.peak_tflops = strategy, nan_inf_filter, peak_tflops
        self.last_nonfinite = 0.0  # NaN/inf steps in the last flushed window, summed over ranks
        self.reset()

    def reset(self) -> None:
        device = self.strategy.device
        self.loss = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.nonfinite_steps = torch.zeros((), device=device)  # NaN/inf losses, whatever the log filter
        self.samples = 0
        self.flops = 0.0  # this rank's model FLOPs (a host float: shapes only, no device read)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.grad_norm: Optional[Union[torch.Tensor, float]] = None
        self.start = time.perf_counter()

    def add(self, step: StepResult) -> None:
        self.nonfinite_steps += torch.logical_not(step.finite).to(torch.float32)
        if self.nan_inf_filter:
            self.loss += torch.where(step.finite, step.loss, torch.zeros_like(step.loss))
            self.finite_steps += step.finite.to(torch.float32)
        else:
            self.loss += step.loss
            self.finite_steps += 1.0
        self.samples += step.samples
        self.flops += step.model_flops
        self.tokens += step.tokens
        if step.grad_norm is not None:
            self.grad_norm = step.grad_norm

    def nonfinite_since_flush(self) -> float:
        """NaN/inf steps in the window so far, summed over ranks (a collective and a host read: for save
        points and the end of training, not per step)."""
        # .double() copies, so the reduction leaves the window's own count alone
        return float(self.strategy.batch_all_reduce_sum(self.nonfinite_steps.double().reshape(1)).item())

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def flush(self, learning_rate: float) -> dict[str, float]:
        """The window's logs (the same on every rank); one host sync, then a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        packed = torch.stack([
            self.loss.double(), self.finite_steps.double(),
            torch.tensor(float(self.samples), dtype=torch.float64, device=self.strategy.device),
            self.tokens.double(), self.nonfinite_steps.double(),
            torch.tensor(self.flops, dtype=torch.float64, device=self.strategy.device),
        ])
        reduced = self.strategy.batch_all_reduce_sum(packed)
        norm = self.grad_norm
        if isinstance(norm, torch.Tensor):  # the same global norm on every rank: read in the same transfer
            reduced = torch.cat([reduced, norm.detach().reshape(1).to(reduced)])
        values = reduced.tolist()  # the window's one host sync
        loss_sum, finite_steps, samples, tokens, nonfinite, flops = values[:6]
        self.last_nonfinite = nonfinite
        replicas = self.strategy.layout.batch_ranks
        logs = {
            # every data-parallel rank counted each finite step once
            "loss": loss_sum / max(finite_steps / replicas, 1e-9) if finite_steps else float("nan"),
            "learning_rate": learning_rate,
            "train_samples_per_second": samples / elapsed,
            "train_tokens_per_second": tokens / elapsed,
        }
        logs.update(throughput_logs(flops / self.strategy.world_size, elapsed, self.peak_tflops))  # per GPU
        if norm is not None:
            logs["grad_norm"] = values[6] if isinstance(norm, torch.Tensor) else float(norm)
        self.reset()
        return logs


class RunTotals:
    """Sums over the whole run, for the train() summary (HF's train_* metrics)."""

    def __init__(self, strategy, peak_tflops: Optional[float] = None) -> None:
        self.strategy, self.peak_tflops = strategy, peak_tflops
        self.flops = 0.0
        device = strategy.device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite_steps = 0.0  # NaN/inf losses over the run and the ranks, once summary() read them
        self.steps, self.samples = 0, 0
        self.start = time.perf_counter()

    def add(self, step: StepResult) -> None:
        self.loss += step.loss.double()
        self.nonfinite += torch.logical_not(step.finite).double()
        self.tokens += step.tokens
        self.steps += 1
        self.samples += step.samples
        self.flops += step.model_flops

    def summary(self) -> tuple[float, dict[str, float]]:
        """(mean training loss, metrics); a collective: every rank calls it."""
        runtime = time.perf_counter() - self.start
        device = self.strategy.device
        totals = torch.stack([torch.tensor(float(self.samples), dtype=torch.float64, device=device),
                              self.tokens.double(), self.loss, self.nonfinite,
                              torch.tensor(self.flops, dtype=torch.float64, device=device)])
        samples, tokens, loss_sum, self.nonfinite_steps, flops = self.strategy.batch_all_reduce_sum(totals).tolist()
        peak = torch.tensor([float(peak_memory_bytes(device))], dtype=torch.float64, device=device)
        peak_memory = self.strategy.all_reduce_max(peak).item()
        train_loss = loss_sum / max(self.steps, 1)

        def rate(count: float) -> float:
            return round(count / runtime, 3) if runtime > 0 else 0.0

        return train_loss, {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": rate(samples),
            "train_tokens_per_second": rate(tokens),
            "train_steps_per_second": rate(self.steps),
            "train_loss": train_loss,
            **throughput_logs(flops / self.strategy.world_size, runtime, self.peak_tflops),
            # the most any rank held: the device allocator's peak on CUDA, the process's peak RSS on CPU
            "train_peak_memory_gb": round(peak_memory / 2**30, 3),
        }


class InputTokensSeen:
    """HF's include_num_input_tokens_seen: input tokens of every micro-batch on every rank
    ("all": the main input's elements; "non_padding": its attention mask's ones, or the
    tokens that are not the pad id). Counted without waiting for the device; the total
    over ranks is added to state.num_input_tokens_seen at each `settle` (every log,
    evaluation and save, and the end of training: one reduction per interval, not per step)."""

    def __init__(self, mode: str, strategy, main_input_name: str, pad_token_id: Optional[int]) -> None:
        self.mode, self.strategy = mode, strategy
        self.main_input_name, self.pad_token_id = main_input_name, pad_token_id
        self.pending = torch.zeros((), dtype=torch.int64)
        self.session_start: Optional[int] = None  # the count when this train() call began

    @property
    def enabled(self) -> bool:
        return self.mode != "no"

    def add(self, micro_batches: list) -> None:
        if not self.enabled or self.strategy.layout.sp_rank:  # a row's first sp rank counts it for all of them
            return
        for batch in micro_batches:
            self.pending = self.pending + self._count(batch).to(self.pending.device)

    def _count(self, batch) -> torch.Tensor:
        ids = batch.get(self.main_input_name)
        if not isinstance(ids, torch.Tensor):
            raise ValueError(
                f"include_num_input_tokens_seen={self.mode!r}: the batches have no {self.main_input_name!r} "
                f"(the model's main_input_name; batch keys {sorted(batch)}); set it to 'no'")
        if self.mode == "non_padding":
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                return (mask != 0).sum()
            if self.pad_token_id is not None:
                return (ids != self.pad_token_id).sum()
        return torch.tensor(ids.numel())

    def settle(self, state) -> None:
        """A collective while enabled: every rank calls it at the same points."""
        if not self.enabled:
            return
        total = self.strategy.batch_all_reduce_sum(self.pending.to(self.strategy.device, torch.float64).reshape(1))
        state.num_input_tokens_seen += int(total.item())
        self.pending = torch.zeros((), dtype=torch.int64)


class MemoryMetrics(TrainerMemoryTracker):
    """HF's memory tracker (skip_memory_metrics=False: *_mem_cpu_* and *_mem_gpu_* deltas in the
    metrics of init, train, evaluate and predict), told its stage: HF's derives it from the name of
    the calling method, which scaletrain's parts (the train loop) do not share."""

    def __init__(self, skip_memory_metrics: bool) -> None:
        super().__init__(skip_memory_metrics)
        self._stage: Optional[str] = None

    def derive_stage(self) -> str:
        return self._stage

    def begin(self, stage: str) -> None:
        self._stage = stage
        self.start()

    def end(self, stage: str, metrics: Optional[dict] = None) -> None:
        self._stage = stage
        self.stop_and_update_metrics(metrics)
