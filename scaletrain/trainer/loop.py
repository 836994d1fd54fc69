"""The train loop: epochs of optimizer steps, with the HF callback events between them."""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

from accelerate.utils.memory import clear_device_cache
from transformers.trainer_utils import TrainOutput

from ..checkpoint.manager import latest_checkpoint
from ..data.position import iter_keeping_rng, position_epoch
from ..errors import NonFiniteLossError
from .flops import peak_tflops
from .metrics import LogWindow, RunTotals
from ..optimizers.factory import current_lr, set_optimizer_mode
from .plan import RunPlan
from .preemption import Preempted, PreemptionWatch
from .progress import TrainProgress
from .step import StepResult, StepRunner

logger = logging.getLogger(__name__)


class _StepGroups:
    """Micro-batches grouped per optimizer step; `exhausted` once the epoch's data ran out."""

    def __init__(self, batches: Iterator, size: int) -> None:
        self.batches, self.size, self.exhausted = batches, size, False

    def __iter__(self):
        while True:
            group = list(itertools.islice(self.batches, self.size))
            self.exhausted = len(group) < self.size
            if not group:
                return
            yield group


class TrainLoop:
    def __init__(self, trainer, plan: RunPlan, progress: TrainProgress, runner: StepRunner,
                 ignore_keys_for_eval: Optional[list[str]], preemption: PreemptionWatch) -> None:
        self.trainer, self.plan, self.progress, self.runner = trainer, plan, progress, runner
        self.ignore_keys = ignore_keys_for_eval
        self.preemption = preemption
        self.saved: Optional[tuple[int, Path]] = None  # (step, folder) of the last checkpoint this loop wrote
        self.flushed_at: Optional[int] = None  # the step of the last log window read
        self.peak_tflops = peak_tflops(trainer.strategy.device, trainer.args.peak_tflops)
        self.window = LogWindow(trainer.strategy, trainer.args.logging_nan_inf_filter, self.peak_tflops)

    def run(self) -> TrainOutput:
        trainer, plan, progress = self.trainer, self.plan, self.progress
        trainer.fire("on_train_begin")
        if trainer.args.eval_on_start and trainer.eval_dataset is not None:
            trainer.evaluate_and_track(self.ignore_keys, step_schedule=False)
        self.window.reset()
        totals = RunTotals(trainer.strategy, self.peak_tflops)
        trainer.model_wrapped.train()
        set_optimizer_mode(trainer.optimizer, training=True)
        start_epoch, skip = progress.epoch, progress.micro_batches_in_epoch
        for epoch in range(start_epoch, plan.num_epochs):
            if trainer.state.global_step >= plan.max_steps:
                break  # resumed from the last step's checkpoint (a restart after it was written): nothing to train
            micro_done = skip if epoch == start_epoch else 0
            groups = self._epoch(epoch, micro_done)
            trainer.fire("on_epoch_begin")
            for micro_batches in groups:
                trainer.fire("on_step_begin")
                trainer.input_tokens.add(micro_batches)
                result = self.runner.run(trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler,
                                         micro_batches)
                trainer.model_wrapped = trainer.strategy.settled_model(trainer.model_wrapped)
                micro_done += len(micro_batches)
                totals.add(result)
                self._after_step(epoch, micro_done, result)
                if self.preemption.should_stop():
                    self._stop_preempted()
                if trainer.control.should_epoch_stop or trainer.control.should_training_stop:
                    break
            if groups.exhausted or plan.epoch_is_over(micro_done):
                trainer.state.epoch = float(epoch + 1)
                progress.end_epoch(epoch)
            # like the HF Trainer: epoch-end events also fire when max_steps ends the epoch early
            trainer.fire("on_epoch_end")
            self._log_save_evaluate()
            if trainer.control.should_training_stop or trainer.state.global_step >= plan.max_steps:
                break
        return self._finish(totals)

    def _epoch(self, epoch: int, micro_done: int) -> _StepGroups:
        loader = self.trainer.train_loader
        replay = position_epoch(loader, epoch, micro_done, self.progress.stream_state)
        # a new epoch's iterator draws its base seed from the global RNG, as torch's DataLoader (and so HF's
        # Trainer) does; the resumed epoch's must not, as the checkpoint's RNG state was taken after that draw
        batches = iter_keeping_rng(loader) if micro_done else iter(loader)
        for _ in range(replay):
            next(batches)
        return _StepGroups(batches, self.plan.accumulation)

    def _after_step(self, epoch: int, micro_done: int, result: StepResult) -> None:
        trainer, progress = self.trainer, self.progress
        if not result.stepped:
            progress.skipped_steps += 1
            logger.info("step %d skipped: NaN/inf loss or gradients", trainer.state.global_step + 1)
        self.window.add(result)
        trainer.current_flos += result.flos
        progress.advance(epoch, micro_done)
        trainer.state.global_step += 1
        trainer.state.epoch = epoch + self.plan.epoch_fraction(micro_done)
        empty_cache_steps = trainer.args.torch_empty_cache_steps
        if empty_cache_steps and trainer.state.global_step % empty_cache_steps == 0:
            clear_device_cache()
        trainer.fire("on_step_end")
        self._log_save_evaluate()

    def _log_save_evaluate(self) -> None:
        trainer, control = self.trainer, self.trainer.control
        if control.should_log or control.should_evaluate or control.should_save:
            trainer.input_tokens.settle(trainer.state)
        if control.should_log:
            trainer.log(self._window_logs())
        paused = time.perf_counter()
        if control.should_evaluate:
            trainer.evaluate_and_track(self.ignore_keys)
        if control.should_save:
            self._save()
            trainer.fire("on_save")
        # training throughput should not count time spent evaluating or saving
        self.window.pause(time.perf_counter() - paused)

    def _save(self) -> None:
        """A checkpoint, unless a NaN/inf loss since the last check poisoned the state (nonfinite_loss=stop)."""
        trainer = self.trainer
        if trainer.args.nonfinite_loss == "stop" and self.flushed_at != trainer.state.global_step:
            self._check_nonfinite(self.window.nonfinite_since_flush())
        self.saved = (trainer.state.global_step, trainer.save_checkpoint())

    def _check_nonfinite(self, count: float) -> None:
        trainer = self.trainer
        if count <= 0 or trainer.args.nonfinite_loss == "skip":  # skipped steps are counted in the logs
            return
        step = trainer.state.global_step
        if trainer.args.nonfinite_loss == "continue":
            logger.warning("the training loss was NaN or inf in %d rank-step(s) up to step %d; training goes "
                           "on (nonfinite_loss='continue')", int(count), step)
            return
        last = latest_checkpoint(trainer.args.output_dir)
        raise NonFiniteLossError(
            f"the training loss was NaN or inf in {int(count)} rank-step(s) up to step {step}; every rank stops "
            f"and no checkpoint of this state is written. {last or 'No committed checkpoint'} holds the last good "
            "state: resume from it with a lower learning_rate or max_grad_norm (or fp32/bf16 instead of fp16), "
            "or set nonfinite_loss='skip' to leave such steps out")

    def _stop_preempted(self) -> None:
        """Every rank agreed to stop after this step: commit a checkpoint here (unless one was just
        written) and leave train() with Preempted, or with enable_jit_checkpoint end training (HF's)."""
        trainer = self.trainer
        step = trainer.state.global_step
        if self.saved is None or self.saved[0] != step:
            self._save()
        trainer.checkpoints.finish_pending()
        path = self.saved[1]
        if trainer.args.enable_jit_checkpoint:
            logger.warning("checkpoint %s committed at step %d on a signal; training stops", path, step)
            trainer.control.should_training_stop = True
            return
        logger.warning("preempted: checkpoint %s committed at step %d; exiting", path, step)
        raise Preempted(step, str(path))

    def _window_logs(self) -> dict[str, float]:
        trainer = self.trainer
        stepped_at = self.runner.learning_rate
        logs = self.window.flush(stepped_at if stepped_at is not None else current_lr(trainer.lr_scheduler,
                                                                                      trainer.optimizer))
        self.flushed_at = trainer.state.global_step
        self._check_nonfinite(self.window.last_nonfinite)
        logs.update(trainer.middleware.log_values())
        scale = trainer.strategy.loss_scale()
        if scale is not None:
            logs["loss_scale"] = float(scale)
        if trainer.strategy.precision.is_mixed or trainer.args.nonfinite_loss == "skip":
            logs["skipped_steps"] = self.progress.skipped_steps
        return logs

    def _finish(self, totals: RunTotals) -> TrainOutput:
        trainer = self.trainer
        trainer.checkpoints.finish_pending()  # a background save is committed before training returns
        trainer.middleware.after_training(trainer.model)
        train_loss, metrics = totals.summary()
        if trainer.args.nonfinite_loss == "stop":  # steps after the last log or save: read with the totals
            self._check_nonfinite(totals.nonfinite_steps)
        trainer.input_tokens.settle(trainer.state)
        trainer.store_flos()  # into state.total_flos; HF 5 leaves it out of the train metrics
        metrics["epoch"] = trainer.state.epoch
        best = trainer.state.best_model_checkpoint
        if trainer.args.load_best_model_at_end and best is not None:
            logger.debug("loading best model from %s (%s=%s)", best, trainer.args.metric_for_best_model,
                        trainer.state.best_metric)
            trainer.checkpoints.load_model(best, trainer.model_wrapped)
        # checkpoints hold a schedule-free optimizer's training point (exact resume); the trained model
        # is left at its evaluation point, which save_model then exports
        set_optimizer_mode(trainer.optimizer, training=False)
        trainer.memory_metrics.end("train", metrics)
        trainer.log(metrics)
        trainer.fire("on_train_end")
        return TrainOutput(trainer.state.global_step, train_loss, metrics)
