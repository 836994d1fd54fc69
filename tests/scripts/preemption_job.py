"""One process training tiny GPT-2 that signals itself: SIGNALS=step:gap sends SIGTERM at that step, and
a second one `gap` seconds later if gap is given (the second must end the process at once)."""
from __future__ import annotations

import os
import signal
import sys
import time

from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, tiny_gpt2
from scaletrain import Trainer, TrainingArguments


class SignalSelf(TrainerCallback):
    def __init__(self, spec: str) -> None:
        step, _, gap = spec.partition(":")
        self.step, self.gap = int(step), float(gap) if gap else None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            if self.gap is not None:
                time.sleep(self.gap)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # never reached: the second signal ends the process


def main(out: str) -> None:
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=4, save_steps=2,
                             logging_steps=1, disable_tqdm=True, preemption_grace_period=float(
                                 os.environ.get("GRACE", "30")))
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(32),
                      callbacks=[SignalSelf(os.environ["SIGNALS"])])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
