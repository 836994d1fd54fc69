"""A search job for the resume tests: tiny GPT-2, 4 trials on a storage; KILL_AT=trial:step:SIGNAL sends the
job SIGKILL (a node lost) or SIGTERM (a preemption) in that trial's step (a checkpoint every 2 steps)."""
from __future__ import annotations

import os
import signal
import sys

import optuna
from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from scaletrain.search.study import finished_trials


class KillAt(TrainerCallback):
    def __init__(self, trainer_ref: list, spec: str) -> None:
        self.trainer_ref = trainer_ref
        trial, step, name = spec.split(":") if spec else (-1, -1, "SIGKILL")
        self.trial, self.step, self.signal = int(trial), int(step), getattr(signal, name)

    def on_step_end(self, args, state, control, **kwargs):
        trial = self.trainer_ref[0]._trial
        if trial is not None and trial.number == self.trial and state.global_step == self.step:
            os.kill(os.getpid(), self.signal)


def main(out: str, storage: str) -> None:
    ref: list = []
    args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, save_steps=2, logging_steps=2, disable_tqdm=True)
    trainer = Trainer(model_init=lambda: tiny_gpt2(), args=args, train_dataset=RaggedLM(32),
                      eval_dataset=RaggedLM(8, seed=5), callbacks=[KillAt(ref, os.environ.get("KILL_AT", ""))])
    ref.append(trainer)
    trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-4, 1e-1, log=True)}, n_trials=4,
        sampler=optuna.samplers.RandomSampler(seed=0), storage=storage, study_name="resume", load_if_exists=True,
        heartbeat_interval=1, grace_period=2)
    print(f"finished trials: {finished_trials(trainer.search_study)} of 4", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
