"""backend='ray': HF's `run_hp_search_ray` on scaletrain's trainer. Ray Tune places each trial in a worker
process of its own (one device per trial), so the search itself is started from one process.

As under HF: `hp_space` returns a Ray Tune search space (default: HF's `default_hp_space_ray`), the other
keyword arguments go to `ray.tune.run` (resources_per_trial, scheduler, search_alg, storage_path,
max_failures, ...), each evaluation is reported with the objective (and the checkpoint saved at that step,
for a trial Ray restarts or a PBT scheduler copies), and the best trial is picked with RAY_SCOPE ('last').
Trials write to `output_dir/run-<trial_id>/` (or hp_name(config)).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import BestRun

from ..checkpoint.manager import PREFIX as CHECKPOINT_PREFIX
from ..checkpoint.manager import latest_checkpoint
from ..errors import NotSupportedError
from .errors import SearchConfigError
from .trials import RecordingDict, check_names, check_reads, read_objective, takes_trial, trial_arguments

logger = logging.getLogger(__name__)

# Ray Tune schedulers that decide on intermediate results, which only evaluations during training give
_INTERMEDIATE_SCHEDULERS = ("ASHAScheduler", "AsyncHyperBandScheduler", "HyperBandScheduler", "MedianStoppingRule",
                            "HyperBandForBOHB", "PopulationBasedTraining", "PB2")


def run_ray_search(trainer, hp_space: Callable, compute_objective: Callable, n_trials: int, direction: Any,
                   hp_name: Optional[Callable], kwargs: dict[str, Any]) -> BestRun:
    import ray.tune

    _check(trainer, direction, kwargs)
    kwargs = dict(kwargs)
    kwargs.setdefault("resources_per_trial", {"cpu": 1, **({"gpu": 1} if trainer.strategy.device.type == "cuda"
                                                            else {})})
    kwargs.setdefault("storage_path", os.path.abspath(trainer.args.output_dir))
    trials = RayTrials(trainer, compute_objective, hp_name)
    trainable = ray.tune.with_parameters(_train_trial, trials=trials)
    analysis = ray.tune.run(trainable, config=hp_space(None), num_samples=n_trials, **kwargs)
    scope = os.getenv("RAY_SCOPE", "last")
    best = analysis.get_best_trial(metric="objective", mode=direction[:3], scope=scope)
    if best is None:
        raise RuntimeError(f"no Ray Tune trial reported an objective; see the trials' errors in "
                           f"{analysis.experiment_path}")
    trainer.search_study = analysis
    return BestRun(best.trial_id, best.last_result["objective"], best.config, analysis)


def _check(trainer, direction: Any, kwargs: dict[str, Any]) -> None:
    if trainer.strategy.world_size > 1:
        raise NotSupportedError(
            f"backend='ray' runs each trial in a Ray worker process of its own, but this search was launched on "
            f"{trainer.strategy.world_size} ranks; start it in one process (python script.py) and give each trial "
            "its devices with resources_per_trial, or search on every rank of this launch with backend='optuna'")
    if not isinstance(direction, str) or direction not in ("minimize", "maximize"):
        raise SearchConfigError(f"direction={direction!r}: Ray Tune picks the best trial on one objective, "
                                "'minimize' or 'maximize'; search several objectives with backend='optuna'")
    scheduler = kwargs.get("scheduler")
    name = type(scheduler).__name__
    if name in _INTERMEDIATE_SCHEDULERS and str(getattr(trainer.args.eval_strategy, "value",
                                                         trainer.args.eval_strategy)) == "no":
        raise SearchConfigError(f"scheduler {name} decides on the evaluations during training, but eval_strategy "
                                "is 'no'; set eval_strategy to 'steps' (with eval_steps) or 'epoch'")


class RayTrials:
    """What a Ray worker needs to train one trial; pickled to the workers with the trainer (its model dropped,
    as HF drops it: each trial builds its own with model_init)."""

    def __init__(self, trainer, compute_objective: Callable, hp_name: Optional[Callable]) -> None:
        trainer.model = trainer.model_wrapped = None
        self.trainer, self.compute_objective, self.hp_name = trainer, compute_objective, hp_name
        self.base_args = trainer.args
        self.user_model_init = trainer.model_init
        self.reporter: Optional[RayReporter] = None  # the running trial's

    def run_dir(self, config: dict[str, Any], trial_id: str) -> str:
        return trial_run_dir(self.base_args.output_dir, self.hp_name, config, trial_id)

    def begin(self, config: dict[str, Any], run_dir: str) -> RecordingDict:
        """The trainer rebuilt from the trial's arguments; the trial model_init will see (HF passes Ray's
        config dict)."""
        params = {k: v for k, v in config.items() if k != "wandb"}  # HF drops a W&B key too
        check_names(params, self.base_args, self.user_model_init)
        trial = RecordingDict(params)
        trainer = self.trainer
        self.reporter = RayReporter(self)
        args = trial_arguments(self.base_args, params, run_dir)
        trainer.begin_search_trial(args, trial, self.reporter, lambda _: self._observed_model_init(trial, params))
        trainer.add_callback(self.reporter)
        logger.info("trial %s: %s (output in %s)", trial, params, run_dir)
        return trial

    def _observed_model_init(self, trial: RecordingDict, params: dict[str, Any]):
        init = self.user_model_init
        model = init(trial) if takes_trial(init) else init()
        check_reads(params, trial, self.base_args)
        return model

    def objective_of(self, metrics: dict[str, float]) -> float:
        return float(read_objective(self.compute_objective, metrics))


class RayReporter(TrainerCallback):
    """HF's _report_to_hp_search for Ray: each evaluation's metrics and objective go to `ray.tune.report`.
    When the step also saves, the report waits for that checkpoint (scaletrain evaluates before it saves),
    so Ray receives the resumable checkpoint of the step it was told about."""

    def __init__(self, trials: RayTrials) -> None:
        self.trials = trials
        self.pending: Optional[dict[str, float]] = None

    def report(self, trainer, step: int, metrics: dict[str, float]) -> None:
        trainer.objective = self.trials.objective_of(metrics)
        self.pending = {**metrics, "objective": trainer.objective, "step": step}
        if not trainer.control.should_save:
            self.flush(None)

    def on_save(self, args, state, control, **kwargs):
        if self.pending is not None and self.pending["step"] == state.global_step:
            self.trials.trainer.checkpoints.finish_pending()
            self.flush(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending is not None:
            self.flush(None)

    def flush(self, checkpoint: Optional[Path], done: bool = False) -> None:
        metrics, self.pending = self.pending, None
        report(metrics if not done else {**metrics, "done": True}, checkpoint)


def report(metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
    """`ray.tune.report`, with the checkpoint folder handed over as HF hands it (a folder holding
    checkpoint-N, which Ray copies into its storage); hard links make that copy-free until Ray copies."""
    import ray.tune

    if checkpoint is None:
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix=".ray-report-") as folder:
        shutil.copytree(checkpoint, Path(folder) / checkpoint.name, copy_function=_link_or_copy)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _train_trial(config: dict[str, Any], trials: RayTrials) -> None:
    """One trial in a Ray worker: trained (from Ray's checkpoint when Ray restarts it), and evaluated at the
    end if no evaluation ran during training, as HF does."""
    import ray.tune

    trainer = trials.trainer
    run_dir = trials.run_dir(config, ray.tune.get_context().get_trial_id())
    trial = trials.begin(config, run_dir)
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = next(Path(folder).glob(f"{CHECKPOINT_PREFIX}-*"))
            logger.info("trial resumed by Ray from %s", resume)
            trainer.train(resume_from_checkpoint=str(resume), trial=trial)
    else:
        trainer.train(trial=trial)
    if trainer.objective is None:
        metrics = trainer.evaluate()
        trials.reporter.pending = {**metrics, "objective": trials.objective_of(metrics)}
        trainer.checkpoints.finish_pending()
        trials.reporter.flush(latest_checkpoint(run_dir), done=True)


def trial_run_dir(output_dir: str, hp_name: Optional[Callable], config: dict[str, Any], trial_id: str) -> str:
    """HF's folder for a Ray trial: output_dir/run-<trial_id>, or hp_name(config)."""
    name = hp_name(config) if hp_name is not None else f"run-{trial_id}"
    return os.path.join(os.path.abspath(output_dir), name)


def trial_rows(analysis, output_dir: str, hp_name: Optional[Callable]) -> list[dict[str, Any]]:
    """Each Ray trial as trials.json lists optuna's: its state, objective, config, steps and folder."""
    rows = []
    for trial in analysis.trials:
        result = trial.last_result or {}
        run_dir = trial_run_dir(output_dir, hp_name, trial.config, trial.trial_id)
        last = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        rows.append({"number": trial.trial_id, "state": trial.status, "values": [result.get("objective")],
                     "params": trial.config, "steps": result.get("step"),
                     "reports": result.get("training_iteration"), "run_dir": run_dir,
                     "last_checkpoint": str(last) if last else None,
                     "error": str(trial.error_file) if getattr(trial, "error_file", None) else None})
    return rows


def write_ray_report(analysis, output_dir: str, best: BestRun, hp_name: Optional[Callable]) -> dict[str, Path]:
    import csv
    import json

    out = Path(output_dir)
    rows = trial_rows(analysis, output_dir, hp_name)
    written = {"trials.json": out / "trials.json", "trials.csv": out / "trials.csv"}
    written["trials.json"].write_text(json.dumps({"backend": "ray", "experiment_path": analysis.experiment_path,
                                                  "best_trial": best.run_id, "trials": rows}, indent=2, default=str))
    with written["trials.csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    logger.info("search results: %s", ", ".join(str(p) for p in written.values()))
    return written
