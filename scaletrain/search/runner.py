"""A hyperparameter search on every rank of a launch: rank 0 owns the optuna study; each trial's
parameters, every prune decision and every failure are agreed through collectives, so all ranks
train the same trial and leave it at the same point."""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from transformers.trainer_utils import BestRun

from ..checkpoint.manager import latest_checkpoint
from ..trainer.preemption import Preempted
from .errors import SearchAborted, SearchConfigError, TrialFailed
from .settings import SearchSettings
from .study import finished_trials, retried_number, stop_at
from .trials import (ObservedTrial, check_names, check_reads, read_objective, shared_trial, takes_trial,
                     trial_arguments)

logger = logging.getLogger(__name__)


class DistributedSearch:
    def __init__(self, trainer, hp_space: Callable, compute_objective: Callable, hp_name: Optional[Callable],
                 settings: SearchSettings, n_trials: int) -> None:
        self.trainer, self.hp_space, self.compute_objective = trainer, hp_space, compute_objective
        self.hp_name, self.settings, self.n_trials = hp_name, settings, n_trials
        self.base_args, self.base_strategy = trainer.args, trainer.strategy
        self.user_model_init = trainer.model_init
        self.study_trial: Optional[optuna.Trial] = None  # rank 0's, during a trial
        self.followers_waiting = True  # the other ranks wait for rank 0's next message

    # ------------------------------------------------------------ the ranks
    def run(self):
        if self.base_strategy.is_main:
            return self._lead()
        return self._follow()

    def _lead(self):
        try:
            study = self.settings.create_study()
            remaining = self.n_trials - finished_trials(study)
            if remaining > 0:
                study.optimize(self._objective, n_trials=remaining, timeout=self.settings.timeout,
                               catch=(TrialFailed,) + self.settings.catch,
                               callbacks=[stop_at(self.n_trials)] + self.settings.callbacks,
                               gc_after_trial=self.settings.gc_after_trial,
                               show_progress_bar=self.settings.show_progress_bar)
            best = best_runs(study)
        except BaseException as exc:
            if self.followers_waiting:  # they are not inside a trial: tell them, or they would wait forever
                self._send({"stop": True, "error": f"{type(exc).__name__}: {exc}"})
            raise
        self._send({"stop": True, "best": best})
        self.study = study  # for the report rank 0 writes
        return best

    def _follow(self):
        while True:
            message = self._send(None)
            if message.get("stop"):
                if message.get("error"):
                    raise SearchAborted(f"rank 0 stopped the search: {message['error']}")
                return message["best"]
            self._run_trial(message, None)

    def _send(self, message: Optional[dict]) -> dict:
        """Rank 0's message to every rank (the others pass None and get it)."""
        self.followers_waiting = False
        return self.base_strategy.broadcast_object(message)

    # ------------------------------------------------------------ one trial
    def _objective(self, trial: optuna.Trial):
        params = dict(self.hp_space(trial))
        message = {"number": trial.number, "params": params, "suggested": dict(trial.params),
                   "run_dir": self._run_dir(trial), "resume": self._resume_point(trial)}
        trial.set_user_attr("run_dir", message["run_dir"])
        self._send(message)
        return self._run_trial(message, trial)

    def _run_dir(self, trial) -> str:
        name = self.hp_name(trial) if self.hp_name is not None else f"run-{trial.number}"
        return os.path.join(self.base_args.output_dir, name)

    def _resume_point(self, trial: optuna.Trial) -> Optional[str]:
        """A retried trial (its job was killed) continues from the newest checkpoint the killed one committed."""
        trials = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
        retried = retried_number(trials[trial.number])
        if retried is None or retried not in trials:
            return None
        run_dir = trials[retried].user_attrs.get("run_dir")
        found = latest_checkpoint(run_dir) if run_dir else None
        if found is not None:
            trial.set_user_attr("resumed_from", str(found))
        return str(found) if found is not None else None

    def _run_trial(self, message: dict[str, Any], study_trial: Optional[optuna.Trial]):
        """Every rank: train the trial; agree on how it ended. Rank 0 returns the objective to optuna,
        or raises TrialPruned / TrialFailed for optuna to record."""
        trainer = self.trainer
        self.study_trial = study_trial
        error, pruned = None, False
        try:
            model_init_trial = self._begin_trial(message, study_trial)
            trainer.train(resume_from_checkpoint=message["resume"], trial=model_init_trial)
            if trainer.objective is None:  # no evaluation during training: one now, as HF does
                trainer.objective = self.objective_of(trainer.evaluate())
        except optuna.TrialPruned:
            pruned = True
        except Preempted:
            if study_trial is not None:
                _requeue(study_trial)
            raise
        except (SearchConfigError, SearchAborted):
            raise
        except Exception as exc:  # a bad hyperparameter: recorded, and the search goes on
            logger.exception("trial %d failed", message["number"])
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in self.base_strategy.all_gather_object(error) if e]
        summary = self._end_trial(message["run_dir"])
        self.followers_waiting = True
        if study_trial is None:
            return None
        _record_outcome(study_trial, summary, errors, pruned)
        return trainer.objective

    def _begin_trial(self, message: dict[str, Any], study_trial: Optional[optuna.Trial]) -> ObservedTrial:
        """The trainer rebuilt from the trial's arguments; the trial model_init will see."""
        trainer, params = self.trainer, message["params"]
        check_names(params, self.base_args, self.user_model_init)
        shared = self.base_strategy.world_size > 1
        if shared or study_trial is None:
            trial = shared_trial(message["suggested"], message["number"], self.hp_space)
        else:
            trial = study_trial  # one process: model_init may draw more parameters, as under HF
        observed = ObservedTrial(trial, shared)
        args = trial_arguments(self.base_args, params, message["run_dir"])
        trainer.begin_search_trial(args, observed, self, lambda _: self._observed_model_init(observed, params))
        logger.info("trial %d: %s (output in %s)", message["number"], params, message["run_dir"])
        return observed

    def _observed_model_init(self, observed: ObservedTrial, params: dict[str, Any]):
        model = self.user_model_init(observed) if takes_trial(self.user_model_init) else self.user_model_init()
        check_reads(params, observed, self.base_args)
        return model

    def _end_trial(self, run_dir: str) -> dict[str, Any]:
        """What the study keeps about the trial; the trial's model and optimizer freed, as HF frees them."""
        trainer = self.trainer
        trainer.end_search_trial()
        state = trainer.state
        return {"global_step": state.global_step, "best_checkpoint": state.best_model_checkpoint,
                "last_checkpoint": str(latest_checkpoint(run_dir) or "") or None}

    # ---------------------------------------------------- during training
    def objective_of(self, metrics: dict[str, float]):
        return _checked_objective(read_objective(self.compute_objective, metrics), self.settings.directions)

    def report(self, trainer, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation in training (HF's _report_to_hp_search): the objective to the study;
        the pruner's decision, taken on rank 0, acted on by every rank."""
        trainer.objective = self.objective_of(metrics)
        if self.settings.multi_objective:
            return  # optuna does not prune multi-objective studies
        prune = False
        if self.study_trial is not None:
            self.study_trial.report(float(trainer.objective), step)
            prune = self.study_trial.should_prune()
        if self.base_strategy.broadcast_object(prune):
            trainer.fire("on_train_end")
            raise optuna.TrialPruned()

    # ------------------------------------------------------------- after
    def restore(self) -> None:
        """The trainer as it was built: HF leaves the last trial's values in trainer.args; scaletrain gives
        back the arguments (and strategy) the trainer was constructed with."""
        self.trainer.end_search(self.base_args, self.base_strategy, self.user_model_init)


def _requeue(trial: optuna.Trial) -> None:
    """A preempted trial ends failed, with a retry queued (optuna's RetryFailedTrialCallback), so the
    same search command, run again, trains it from the checkpoint the preemption committed."""
    study = trial.study
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryFailedTrialCallback(inherit_intermediate_values=True)(study, frozen)


def _checked_objective(value: Any, directions: list[str]):
    if len(directions) > 1:
        if not isinstance(value, (list, tuple)) or len(value) != len(directions):
            raise SearchConfigError(f"direction has {len(directions)} entries, so compute_objective must return "
                                    f"{len(directions)} values; it returned {value!r}")
        return [float(v) for v in value]
    if isinstance(value, (list, tuple)):
        raise SearchConfigError(f"compute_objective returned {len(value)} values for one direction; pass "
                                f"direction as a list of {len(value)} to optimise them together")
    value = float(value)
    if math.isnan(value):
        raise ValueError("the objective is NaN")
    return value


def best_runs(study: optuna.Study):
    """HF's BestRun (a list for several objectives); run_summary holds the trial's folder and checkpoints."""
    def run(trial: optuna.trial.FrozenTrial, objective) -> BestRun:
        summary = {k: trial.user_attrs.get(k) for k in ("run_dir", "best_checkpoint", "last_checkpoint",
                                                        "global_step")}
        return BestRun(str(trial.number), objective, trial.params, summary)

    completed = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError(f"no trial of study {study.study_name!r} completed; see the failed trials' errors above")
    if len(study.directions) > 1:
        return [run(t, t.values) for t in study.best_trials]
    best = study.best_trial
    return run(best, best.value)


def checkpoint_to_export(best: BestRun) -> Optional[Path]:
    summary = best.run_summary or {}
    path = summary.get("best_checkpoint") or summary.get("last_checkpoint")
    return Path(path) if path else None


def _record_outcome(study_trial: optuna.Trial, summary: dict[str, Any], errors: list[str], pruned: bool) -> None:
    """Rank 0: the trial's summary on the study, and how it ended (TrialFailed / TrialPruned for optuna)."""
    for key, value in summary.items():
        study_trial.set_user_attr(key, value)
    if errors:
        reason = "; ".join(sorted(set(errors)))
        study_trial.set_user_attr("error", reason)  # optuna keeps no reason for a failed trial
        raise TrialFailed(reason)
    if pruned:
        raise optuna.TrialPruned(f"pruned at step {summary['global_step']}")
