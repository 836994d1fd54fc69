"""Ray Tune searches in one Ray session (starting Ray costs seconds): the same grid under transformers.Trainer
and scaletrain's Trainer, an ASHA search that stops trials early, and a trial that crashes once and is
restarted by Ray from the checkpoint it reported. Prints one JSON line per search for tests/test_search_ray.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
import transformers
from ray import tune
from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, tiny_llama
from scaletrain import Trainer, TrainingArguments

# as tests/test_search.py's PARITY: every optimizer step takes the whole dataset, SGD keeps float noise small
PARITY = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, optim="sgd", weight_decay=0.01,
              max_grad_norm=1.0, eval_strategy="epoch", save_strategy="epoch", logging_steps=1, seed=0,
              disable_tqdm=True, per_device_eval_batch_size=32, report_to="none")
GRID = {"learning_rate": tune.grid_search([0.05, 0.5, 1.5]), "num_train_epochs": tune.grid_search([1, 3])}


class RecordTrial(TrainerCallback):
    """Each trial's view from inside its Ray worker: the arguments it trained with, where it started and
    ended, and the evaluations it saw (written next to the trial's checkpoints)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(args, {"start_step": state.global_step, "learning_rate": args.learning_rate,
                           "num_train_epochs": args.num_train_epochs, "pid": os.getpid()})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._write(args, {"eval_step": state.global_step, "eval_loss": metrics["eval_loss"]})

    @staticmethod
    def _write(args, record: dict) -> None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / "record.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class CrashOnce(TrainerCallback):
    """A worker lost mid-trial: the first attempt of the trial dies after `step`'s checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        marker = Path(args.output_dir) / "crashed"
        if state.global_step == self.step and not marker.exists():
            marker.touch()
            os._exit(3)


def _trials(analysis, out: Path) -> list[dict]:
    rows = []
    for trial in analysis.trials:
        run_dir = out / f"run-{trial.trial_id}"
        records = [json.loads(line) for line in (run_dir / "record.jsonl").read_text().splitlines()] \
            if (run_dir / "record.jsonl").exists() else []
        rows.append({"id": trial.trial_id, "config": trial.config, "status": trial.status,
                     "objective": (trial.last_result or {}).get("objective"),
                     "iterations": (trial.last_result or {}).get("training_iteration"), "records": records,
                     "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*"))})
    return rows


def grid(library: str, out: Path) -> dict:
    module = transformers if library == "hf" else sys.modules["scaletrain"]
    extra = {"use_cpu": True} if library == "hf" else {}
    trainer = module.Trainer(model_init=lambda: tiny_llama(), args=module.TrainingArguments(
        output_dir=str(out), **PARITY, **extra), train_dataset=RaggedLM(32), eval_dataset=RaggedLM(16, seed=4),
        callbacks=[RecordTrial()])
    best = trainer.hyperparameter_search(backend="ray", hp_space=lambda _: GRID, n_trials=1, direction="minimize",
                                         storage_path=str(out / "ray"), verbose=0)
    return {"search": f"grid-{library}", "best": [best.run_id, best.objective, best.hyperparameters],
            "trials": _trials(best.run_summary, out)}


def asha(out: Path) -> dict:
    trainer = Trainer(model_init=lambda: tiny_llama(), args=TrainingArguments(
        output_dir=str(out), **{**PARITY, "num_train_epochs": 6, "save_strategy": "no"}),
        train_dataset=RaggedLM(32), eval_dataset=RaggedLM(16, seed=4), callbacks=[RecordTrial()])
    scheduler = tune.schedulers.ASHAScheduler(metric="objective", mode="min", max_t=6, grace_period=1,
                                              reduction_factor=3)
    space = {"learning_rate": tune.grid_search([0.002, 0.01, 0.3, 1.0])}
    best = trainer.hyperparameter_search(backend="ray", hp_space=lambda _: space, n_trials=1, direction="minimize",
                                         scheduler=scheduler, storage_path=str(out / "ray"), verbose=0,
                                         resources_per_trial={"cpu": 2})  # one trial at a time: ASHA sees rungs
    return {"search": "asha", "best": [best.run_id, best.objective, best.hyperparameters],
            "trials": _trials(best.run_summary, out)}


def restart(out: Path) -> dict:
    """The trial dies after step 2's checkpoint (before its report), so Ray restarts it from step 1's; the
    reference is the same training without Ray, uninterrupted."""
    args = {**PARITY, "num_train_epochs": 4}
    trainer = Trainer(model_init=lambda: tiny_llama(), args=TrainingArguments(output_dir=str(out), **args),
                      train_dataset=RaggedLM(32), eval_dataset=RaggedLM(16, seed=4),
                      callbacks=[RecordTrial(), CrashOnce(step=2)])
    best = trainer.hyperparameter_search(backend="ray", hp_space=lambda _: {"learning_rate": tune.grid_search([0.5])},
                                         n_trials=1, direction="minimize", max_failures=1,
                                         storage_path=str(out / "ray"), verbose=0)
    plain = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(out / "plain"), **{
        **args, "learning_rate": 0.5, "save_strategy": "no"}), train_dataset=RaggedLM(32),
        eval_dataset=RaggedLM(16, seed=4))
    plain.train()
    reference = [e["eval_loss"] for e in plain.state.log_history if "eval_loss" in e]
    return {"search": "restart", "best": [best.run_id, best.objective, best.hyperparameters],
            "trials": _trials(best.run_summary, out), "reference_eval_losses": reference}


def main(out: str, searches: list[str]) -> None:
    tests_dir = str(Path(__file__).resolve().parent.parent)
    # workers import the test helpers that model_init uses, as a user's workers import the user's modules
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}})
    for name in searches:
        kind, _, library = name.partition(":")
        folder = Path(out) / name.replace(":", "-")
        result = grid(library, folder) if kind == "grid" else asha(folder) if kind == "asha" else restart(folder)
        print("RESULT " + json.dumps(result, default=str), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
