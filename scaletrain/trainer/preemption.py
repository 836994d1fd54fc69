"""Preemption: SIGTERM (SLURM, spot reclaim, scancel, torchrun's shutdown) or SIGUSR1 (SLURM's
`--signal=USR1@90`) asks the run to stop. Every rank finishes its optimizer step, the ranks agree on
the step to stop at, the run commits a checkpoint there and leaves with PREEMPTED_EXIT_CODE. A second
signal, or the grace period running out, ends the process at once; the previous committed
checkpoint stays the resume target (a save is only ever committed whole)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from transformers.trainer_jit_checkpoint import CheckpointManager, JITCheckpointCallback

logger = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL ("try again later"): a checkpoint at the step reached was committed;
# launch/slurm.sbatch requeues the job on it, and resume_from_checkpoint=auto continues it
PREEMPTED_EXIT_CODE = 75
# SLURM signals every process of a step and torchrun forwards the signal to its workers too: a worker can
# receive one request twice within milliseconds, which must not count as the second signal
_DUPLICATE_S = 1.0


class Preempted(SystemExit):
    """Raised by train() after the checkpoint of a preempted run is committed; uncaught, the process
    exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        return f"preempted: checkpoint {self.checkpoint} committed at step {self.step}"


class PreemptionWatch:
    """Installed around the train loop on the main thread. `should_stop()` is called once per optimizer
    step by every rank: each rank's 'signal seen' flag is summed over ranks in the background and read one
    step later, so all ranks stop after the same step without waiting on the device."""

    def __init__(self, strategy, signal_names: list[str], grace_s: float, exits: bool = True) -> None:
        self.strategy, self.grace_s, self.exits = strategy, grace_s, exits
        self.signals = [getattr(signal, name) for name in signal_names]
        self.requested_at: Optional[float] = None
        self._previous: dict[int, object] = {}
        self._pending = None  # reads the last step's reduction
        self._done = threading.Event()  # set when train() leaves: the grace deadline no longer applies

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        elif self.signals:
            logger.warning("train() runs outside the main thread: preemption signals are not watched")
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pending is not None:
            self._pending()  # every rank started the same number of reductions
            self._pending = None

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested_at is not None and time.monotonic() - self.requested_at < _DUPLICATE_S:
            return  # the scheduler and the launcher both forwarded the same request
        if self.requested_at is not None:
            print(f"scaletrain: second {name}: exiting now; the last committed checkpoint is the resume target",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested_at = time.monotonic()
        then = f"exiting with {PREEMPTED_EXIT_CODE}" if self.exits else "ending training"
        print(f"scaletrain: {name}: finishing this step, then saving a checkpoint and {then} "
              f"(within {self.grace_s:.0f} s)", file=sys.stderr, flush=True)
        threading.Thread(target=self._deadline, args=(signum,), daemon=True).start()

    def _deadline(self, signum: int) -> None:
        if self._done.wait(self.grace_s):
            return  # train() returned or raised Preempted in time
        print(f"scaletrain: preemption grace period ({self.grace_s:.0f} s) is over: exiting now; the last "
              f"committed checkpoint is the resume target", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def should_stop(self) -> bool:
        mine = self.requested_at is not None
        if not self.strategy.has_collectives():
            return mine
        agreed = self._pending() if self._pending is not None else False
        self._pending = self._start_reduction(mine)
        return agreed

    def _start_reduction(self, mine: bool):
        """Sum the ranks' flags on the default group (a group made now would hang after a torchrun
        restart: its store keys are the previous incarnation's); returns a reader of the result, called
        one step later. On an accelerator the reduction and its copy to pinned host memory are queued
        on the stream, and the reader waits for that copy's event only, not for the device."""
        device = self.strategy.device
        if device.type == "cpu":
            flags = torch.tensor([int(mine)], dtype=torch.int64)
            work = dist.all_reduce(flags, op=dist.ReduceOp.SUM, async_op=True)

            def read_cpu() -> bool:
                work.wait()
                return int(flags[0]) > 0
            return read_cpu
        send = torch.tensor([int(mine)], dtype=torch.int64).pin_memory()
        flags = send.to(device, non_blocking=True)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, async_op=True).wait()  # the stream waits, not the host
        received = torch.empty(1, dtype=torch.int64).pin_memory()
        received.copy_(flags, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read_pinned() -> bool:
            done.synchronize()
            return int(received[0]) > 0
        return read_pinned


class WatchedJITCheckpointCallback(JITCheckpointCallback):
    """HF's JIT checkpoint callback, in the list where HF's Trainer puts it with enable_jit_checkpoint, with
    HF's CheckpointManager (code that drives it directly saves through Trainer._save_checkpoint). SIGTERM
    itself is caught by PreemptionWatch for the duration of train(), where every rank agrees on the step to
    save; so this one installs no handler of its own, which would outlive training and swallow a later
    SIGTERM."""

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer
        if trainer.args.enable_jit_checkpoint:
            self.jit_manager = CheckpointManager(trainer=trainer)


def jit_callbacks(trainer) -> list:
    """The callbacks enable_jit_checkpoint adds to HF's default list."""
    if not trainer.args.enable_jit_checkpoint:
        return []
    callback = WatchedJITCheckpointCallback()
    callback.set_trainer(trainer)
    return [callback]
