"""Training logs: a window of steps accumulated on the device and read once per flush, and the run summary."""
from __future__ import annotations

import time
from typing import Optional, Union

import torch

from .step import StepResult


class LogWindow:
    """Loss, sample and token sums since the last log, as device tensors. Time spent
    evaluating or saving is excluded from the throughput (see `pause`)."""

    def __init__(self, strategy, nan_inf_filter: bool) -> None:
        self.strategy, self.nan_inf_filter = strategy, nan_inf_filter
        self.reset()

    def reset(self) -> None:
        device = self.strategy.device
        self.loss = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.samples = 0
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.grad_norm: Optional[Union[torch.Tensor, float]] = None
        self.start = time.perf_counter()

    def add(self, step: StepResult) -> None:
        if self.nan_inf_filter:
            finite = torch.isfinite(step.loss)
            self.loss += torch.where(finite, step.loss, torch.zeros_like(step.loss))
            self.finite_steps += finite.to(torch.float32)
        else:
            self.loss += step.loss
            self.finite_steps += 1.0
        self.samples += step.samples
        self.tokens += step.tokens
        if step.grad_norm is not None:
            self.grad_norm = step.grad_norm

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def flush(self, learning_rate: float) -> dict[str, float]:
        """The window's logs (the same on every rank); one host sync, then a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        packed = torch.stack([
            self.loss.double(), self.finite_steps.double(),
            torch.tensor(float(self.samples), dtype=torch.float64, device=self.strategy.device),
            self.tokens.double(),
        ])
        reduced = self.strategy.all_reduce_sum(packed)
        norm = self.grad_norm
        if isinstance(norm, torch.Tensor):  # the same global norm on every rank: read in the same transfer
            reduced = torch.cat([reduced, norm.detach().reshape(1).to(reduced)])
        values = reduced.tolist()  # the window's one host sync
        loss_sum, finite_steps, samples, tokens = values[:4]
        world = self.strategy.world_size
        logs = {
            # every rank counted each finite step once
            "loss": loss_sum / max(finite_steps / world, 1e-9) if finite_steps else float("nan"),
            "learning_rate": learning_rate,
            "train_samples_per_second": samples / elapsed,
            "train_tokens_per_second": tokens / elapsed,
        }
        if norm is not None:
            logs["grad_norm"] = values[4] if isinstance(norm, torch.Tensor) else float(norm)
        self.reset()
        return logs


class RunTotals:
    """Sums over the whole run, for the train() summary (HF's train_* metrics)."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy
        device = strategy.device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.steps, self.samples = 0, 0
        self.start = time.perf_counter()

    def add(self, step: StepResult) -> None:
        self.loss += step.loss.double()
        self.tokens += step.tokens
        self.steps += 1
        self.samples += step.samples

    def summary(self) -> tuple[float, dict[str, float]]:
        """(mean training loss, metrics); a collective: every rank calls it."""
        runtime = time.perf_counter() - self.start
        device = self.strategy.device
        totals = torch.stack([torch.tensor(float(self.samples), dtype=torch.float64, device=device),
                              self.tokens.double(), self.loss])
        samples, tokens, loss_sum = self.strategy.all_reduce_sum(totals).tolist()
        train_loss = loss_sum / max(self.steps, 1)

        def rate(count: float) -> float:
            return round(count / runtime, 3) if runtime > 0 else 0.0

        return train_loss, {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": rate(samples),
            "train_tokens_per_second": rate(tokens),
            "train_steps_per_second": rate(self.steps),
            "train_loss": train_loss,
        }
