"""Trainer.hyperparameter_search in one process: against the HF Trainer's search on the same script,
pruning, grid search, failing trials, bad input, and a killed search resumed from its storage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import transformers
from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, tiny_gpt2, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.errors import NotSupportedError
from scaletrain.search import SearchConfigError

SCRIPTS = Path(__file__).parent / "scripts"
# every optimizer step takes the whole dataset (8 x 4 accumulation = 32 rows), so HF's own shuffling
# cannot change a step; SGD keeps float-order noise small (as in test_references.py)
PARITY = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, optim="sgd", weight_decay=0.01,
              max_grad_norm=1.0, eval_strategy="epoch", save_strategy="no", logging_steps=1, seed=0,
              disable_tqdm=True, per_device_eval_batch_size=32, report_to="none")


def parity_space(trial) -> dict:
    return {"learning_rate": trial.suggest_float("learning_rate", 0.01, 2.0, log=True),
            "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 3)}


def _search(trainer) -> tuple:
    storage = optuna.storages.InMemoryStorage()  # the HF Trainer keeps no handle on its study: read it back
    best = trainer.hyperparameter_search(
        hp_space=parity_space, n_trials=5, direction="minimize", sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0), study_name="parity",
        storage=storage)
    return best, optuna.load_study(study_name="parity", storage=storage)


def test_search_matches_the_hf_trainer_trial_by_trial(tmp_path):
    hf = transformers.Trainer(model_init=lambda: tiny_llama(), args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, **PARITY), train_dataset=RaggedLM(32),
        eval_dataset=RaggedLM(16, seed=4))
    ours = Trainer(model_init=lambda: tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "ours"), **PARITY),
                   train_dataset=RaggedLM(32), eval_dataset=RaggedLM(16, seed=4))
    (hf_best, hf_study), (our_best, our_study) = _search(hf), _search(ours)
    hf_trials, our_trials = hf_study.trials, our_study.trials
    assert [t.state for t in our_trials] == [t.state for t in hf_trials]
    assert optuna.trial.TrialState.PRUNED in [t.state for t in hf_trials]  # the pruner acted, in both
    for hf_trial, our_trial in zip(hf_trials, our_trials, strict=True):
        assert our_trial.params == hf_trial.params
        assert sorted(our_trial.intermediate_values) == sorted(hf_trial.intermediate_values)
        np.testing.assert_allclose(list(our_trial.intermediate_values.values()),
                                   list(hf_trial.intermediate_values.values()), rtol=1e-5)
    assert (our_best.run_id, our_best.hyperparameters) == (hf_best.run_id, hf_best.hyperparameters)
    np.testing.assert_allclose(our_best.objective, hf_best.objective, rtol=1e-5)
    assert our_best.run_summary["run_dir"] == str(tmp_path / "ours" / f"run-{our_best.run_id}")
    # the trainer is given back as it was built (HF would keep the last trial's learning rate)
    assert ours.args.learning_rate == TrainingArguments(output_dir="x").learning_rate
    assert json.loads((tmp_path / "ours" / "trials.json").read_text())["best_trial"] == int(our_best.run_id)
    for plot in ("optimization_history.png", "intermediate_values.png", "parallel_coordinate.png",
                 "param_importances.png"):
        assert (tmp_path / "ours" / plot).read_bytes()[:4] == b"\x89PNG"


class RecordArgs(TrainerCallback):
    """What each trial's training really ran with, read from the arguments the trainer hands callbacks."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs.append({"learning_rate": args.learning_rate, "per_device_train_batch_size":
                          args.per_device_train_batch_size, "output_dir": args.output_dir})

    def on_step_end(self, args, state, control, **kwargs):
        self.runs[-1]["steps"] = state.global_step


def _gpt2_trainer(tmp_path, record: RecordArgs | None = None, model_init=None, **overrides) -> Trainer:
    args = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, eval_strategy="steps",
                eval_steps=2, save_steps=3, logging_steps=1, disable_tqdm=True, learning_rate=1e-3, report_to="jsonl")
    args.update(overrides)
    return Trainer(model_init=model_init or (lambda: tiny_gpt2()), args=TrainingArguments(**args),
                   train_dataset=RaggedLM(32), eval_dataset=RaggedLM(8, seed=5),
                   callbacks=[record] if record else None)


def test_grid_search_visits_exactly_the_grid_and_trains_each_point(tmp_path):
    record = RecordArgs()
    grid = {"learning_rate": [1e-3, 1e-2], "per_device_train_batch_size": [2, 4]}
    trainer = _gpt2_trainer(tmp_path, record)
    trainer.hyperparameter_search(
        hp_space=lambda t: {k: t.suggest_categorical(k, v) for k, v in grid.items()}, n_trials=10,
        sampler=optuna.samplers.GridSampler(grid, seed=0))
    trials = trainer.search_study.trials
    visited = sorted((t.params["learning_rate"], t.params["per_device_train_batch_size"]) for t in trials)
    assert visited == [(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]  # the grid, once each, then the search stops
    for trial, run in zip(trials, record.runs, strict=True):
        assert (run["learning_rate"], run["per_device_train_batch_size"]) == \
            (trial.params["learning_rate"], trial.params["per_device_train_batch_size"])
        assert run["output_dir"] == str(tmp_path / "out" / f"run-{trial.number}") and run["steps"] == 6
        state = json.loads((Path(run["output_dir"]) / "checkpoint-6" / "trainer_state.json").read_text())
        assert state["train_batch_size"] == trial.params["per_device_train_batch_size"]


def test_a_pruned_trial_stops_at_the_evaluation_that_pruned_it(tmp_path):
    record = RecordArgs()
    trainer = _gpt2_trainer(tmp_path, record)
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_categorical("learning_rate", [1e-3, 5.0])}, n_trials=2,
        sampler=optuna.samplers.GridSampler({"learning_rate": [1e-3, 5.0]}, seed=0),
        pruner=optuna.pruners.ThresholdPruner(upper=4.3))
    states = {t.params["learning_rate"]: t for t in trainer.search_study.trials}
    kept, pruned = states[1e-3], states[5.0]
    assert kept.state == optuna.trial.TrialState.COMPLETE and kept.user_attrs["global_step"] == 6
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert list(pruned.intermediate_values) == [2] and pruned.intermediate_values[2] > 4.3
    assert pruned.user_attrs["global_step"] == 2  # stopped at the evaluation, not at the end of the run
    losses = [json.loads(line) for line in (Path(pruned.user_attrs["run_dir"]) / "metrics.jsonl").open()]
    assert max(e["step"] for e in losses) == 2
    assert not any(Path(pruned.user_attrs["run_dir"]).glob("checkpoint-*"))  # save_steps 3 was never reached
    assert best.run_id == str(kept.number)


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    trainer = _gpt2_trainer(tmp_path)
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"warmup_ratio": t.suggest_categorical("warmup_ratio", [0.1, 1.5])}, n_trials=2,
        sampler=optuna.samplers.GridSampler({"warmup_ratio": [0.1, 1.5]}, seed=0))
    by_value = {t.params["warmup_ratio"]: t for t in trainer.search_study.trials}
    assert by_value[1.5].state == optuna.trial.TrialState.FAIL
    assert "warmup_ratio=1.5 must be in [0, 1)" in by_value[1.5].user_attrs["error"]
    assert by_value[0.1].state == optuna.trial.TrialState.COMPLETE
    assert best.hyperparameters == {"warmup_ratio": 0.1}
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"]
    assert sorted(r["state"] for r in rows) == ["COMPLETE", "FAIL"]
    assert "warmup_ratio" in next(r["error"] for r in rows if r["state"] == "FAIL")


def _lr(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}


@pytest.mark.parametrize("case", ["unknown-field", "unread-name", "empty-space", "prune-without-eval",
                                  "missing-metric", "objective-count", "ray-multi-objective",
                                  "ray-scheduler-without-eval", "sigopt", "n_jobs"])
def test_bad_search_input_stops_the_search_before_training(tmp_path, case):
    model_init, overrides, kwargs = None, {}, {"n_trials": 3, "hp_space": _lr}
    expected = {
        "unknown-field": (SearchConfigError, "'learning_rat'"),
        "unread-name": (SearchConfigError, "model_init never reads"),
        "empty-space": (SearchConfigError, "the search space is empty"),
        "prune-without-eval": (SearchConfigError, "eval_strategy is 'no'"),
        "missing-metric": (SearchConfigError, "'eval_accuracy', which the evaluation does not produce"),
        "objective-count": (SearchConfigError, "direction has 2 entries"),
        "ray-multi-objective": (SearchConfigError, "Ray Tune picks the best trial on one objective"),
        "ray-scheduler-without-eval": (SearchConfigError, "AsyncHyperBandScheduler decides on the evaluations"),
        "sigopt": (NotSupportedError, "backend='sigopt' is not supported"),
        "n_jobs": (NotSupportedError, "n_jobs=2"),
    }[case]
    if case == "unknown-field":
        kwargs["hp_space"] = lambda t: {"learning_rat": t.suggest_float("learning_rat", 1e-4, 1e-2)}
    elif case == "unread-name":
        model_init = lambda trial: tiny_gpt2()  # noqa: E731 - takes the trial but reads nothing from it
        kwargs["hp_space"] = lambda t: {"lora_rank": t.suggest_int("lora_rank", 2, 8)}
    elif case == "empty-space":
        kwargs["hp_space"] = lambda t: {}
    elif case == "prune-without-eval":
        overrides, kwargs["pruner"] = {"eval_strategy": "no"}, optuna.pruners.MedianPruner()
    elif case == "missing-metric":
        kwargs["compute_objective"] = lambda metrics: metrics["eval_accuracy"]
    elif case == "objective-count":
        kwargs["direction"] = ["minimize", "maximize"]
    elif case == "ray-multi-objective":
        kwargs.update(backend="ray", direction=["minimize", "maximize"])
    elif case == "ray-scheduler-without-eval":
        from ray.tune.schedulers import ASHAScheduler

        overrides, kwargs["backend"], kwargs["scheduler"] = {"eval_strategy": "no"}, "ray", ASHAScheduler()
    elif case == "sigopt":
        kwargs["backend"] = "sigopt"
    else:
        kwargs["n_jobs"] = 2
    trainer = _gpt2_trainer(tmp_path, model_init=model_init, **overrides)
    with pytest.raises(expected[0], match=expected[1].replace("(", r"\(").replace("[", r"\[")):
        trainer.hyperparameter_search(**kwargs)
    trained = sorted((tmp_path / "out").glob("run-*/checkpoint-*"))
    assert trained == [], f"{case}: trials trained before the error: {trained}"
    assert trainer.args.output_dir == str(tmp_path / "out")  # given back as built


def _job(out: Path, storage: str, kill: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), KILL_AT=kill or "")
    return subprocess.run([sys.executable, str(SCRIPTS / "search_job.py"), str(out), storage], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_or_preempted_search_resumes_from_its_storage(tmp_path, how):
    """The job is SIGKILLed (or preempted by SIGTERM) in trial 2's step 5. Run again on the same sqlite
    study, trials 0 and 1 are not rerun, trial 2 is retried with its parameters from its last checkpoint
    (4 after a kill; 5, written by the preemption, after SIGTERM), and the study ends with n_trials finished
    trials whose objectives equal an uninterrupted search's bit for bit."""
    whole = _job(tmp_path / "whole", f"sqlite:///{tmp_path}/whole.db", None)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _job(tmp_path / "resumed", f"sqlite:///{tmp_path}/resumed.db", f"2:5:{how}")
    assert killed.returncode == (-9 if how == "SIGKILL" else 75), killed.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("run-[01]/**/*") if p.is_file()}
    if how == "SIGKILL":
        time.sleep(2.5)  # the killed trial's heartbeat (every 1 s, grace 2 s) goes stale
    again = _job(tmp_path / "resumed", f"sqlite:///{tmp_path}/resumed.db", None)
    assert again.returncode == 0, again.stderr[-3000:]
    study = json.loads((tmp_path / "resumed" / "trials.json").read_text())["trials"]
    reference = json.loads((tmp_path / "whole" / "trials.json").read_text())["trials"]
    assert [(t["number"], t["state"], t["retried"]) for t in study] == \
        [(0, "COMPLETE", False), (1, "COMPLETE", False), (2, "FAIL", True), (3, "COMPLETE", False),
         (4, "COMPLETE", False)]
    retry = study[3]
    assert retry["params"] == study[2]["params"] == reference[2]["params"]
    step = 4 if how == "SIGKILL" else 5
    assert retry["resumed_from"] == str(tmp_path / "resumed" / "run-2" / f"checkpoint-{step}")
    assert [t["values"] for t in study[:2]] + [retry["values"]] == [t["values"] for t in reference[:3]]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # the finished trials' folders were not touched again
    assert "finished trials: 4 of 4" in again.stdout
