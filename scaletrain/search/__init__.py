"""Hyperparameter search with the HF Trainer's API (`Trainer.hyperparameter_search`) on optuna.

Rank 0 owns the study; every rank trains the same trial (runner.py). Trials run in
`output_dir/run-<number>/`; the study's table and plots land in `output_dir`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

from ..errors import NotSupportedError
from .errors import SearchAborted, SearchConfigError, TrialFailed

logger = logging.getLogger(__name__)

_BACKENDS = ("optuna", "ray")
_REFUSED_BACKENDS = {
    "wandb": "W&B sweeps need the W&B service (no network here); use backend='optuna' (report_to='wandb' still "
             "logs each trial's run)",
    "sigopt": "SigOpt is a hosted service (and HF 5 dropped it); use backend='optuna'",
}


def hyperparameter_search(trainer, hp_space: Optional[Callable], compute_objective: Optional[Callable],
                          n_trials: int, direction: Union[str, list[str]], backend: Optional[str],
                          hp_name: Optional[Callable], **kwargs: Any):
    from transformers.trainer_utils import default_compute_objective

    name = _check_request(trainer, backend, n_trials)
    compute_objective = compute_objective if compute_objective is not None else default_compute_objective
    if name == "ray":
        return _ray_search(trainer, hp_space, compute_objective, n_trials, direction, hp_name, kwargs)
    return _optuna_search(trainer, hp_space, compute_objective, n_trials, direction, hp_name, kwargs)


def _optuna_search(trainer, hp_space: Optional[Callable], compute_objective: Callable, n_trials: int,
                   direction: Union[str, list[str]], hp_name: Optional[Callable], kwargs: dict[str, Any]):
    from transformers.trainer_utils import default_hp_space_optuna

    from .runner import DistributedSearch
    from .settings import SearchSettings

    settings = SearchSettings.from_kwargs(direction, kwargs, trainer.args.eval_strategy)
    trainer.hp_search_backend = "optuna"
    trainer.hp_space = hp_space if hp_space is not None else default_hp_space_optuna
    trainer.hp_name = hp_name
    trainer.compute_objective = compute_objective
    search = DistributedSearch(trainer, trainer.hp_space, trainer.compute_objective, hp_name, settings, n_trials)
    try:
        best = search.run()
    finally:
        search.restore()
        trainer.hp_search_backend = None
    if trainer.strategy.is_main:
        trainer.search_study = search.study  # the optuna Study, for anything the report leaves out
        _report(search.study, trainer.args.output_dir, best, settings.keep_best_trial_only)
    return best


def _ray_search(trainer, hp_space: Optional[Callable], compute_objective: Callable, n_trials: int,
                direction: Union[str, list[str]], hp_name: Optional[Callable], kwargs: dict[str, Any]):
    from transformers.trainer_utils import default_hp_space_ray

    from .ray_tune import run_ray_search, write_ray_report

    trainer.hp_search_backend = "ray"
    trainer.hp_space = hp_space if hp_space is not None else default_hp_space_ray
    trainer.hp_name, trainer.compute_objective = hp_name, compute_objective
    try:
        best = run_ray_search(trainer, trainer.hp_space, compute_objective, n_trials, direction, hp_name, kwargs)
    finally:
        trainer.hp_search_backend = None
    write_ray_report(best.run_summary, trainer.args.output_dir, best, hp_name)
    return best


def _check_request(trainer, backend: Optional[str], n_trials: int) -> str:
    name = str(getattr(backend, "value", backend or "optuna"))
    if name in _REFUSED_BACKENDS:
        raise NotSupportedError(f"backend={name!r} is not supported: {_REFUSED_BACKENDS[name]}")
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; scaletrain searches with {' or '.join(_BACKENDS)}")
    if name == "ray":
        _check_ray_installed()
    if trainer.model_init is None:
        raise RuntimeError("To use hyperparameter search, you need to pass your model through a model_init "
                           "function.")  # HF's words
    if trainer.optimizer is not None or trainer.lr_scheduler is not None:
        raise RuntimeError("a hyperparameter search builds a new model per trial, so the optimizers argument "
                           "cannot be used; pass optimizer_cls_and_kwargs or set optim instead")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise SearchConfigError(f"n_trials={n_trials!r} must be a positive integer")
    return name


def _check_ray_installed() -> None:
    try:
        import ray.tune  # noqa: F401
    except ImportError as exc:
        raise NotSupportedError("backend='ray' needs Ray Tune: pip install 'scaletrain[ray]' (ray[tune])") from exc


def _report(study, output_dir: str, best, keep_best_trial_only: bool) -> None:
    from .report import keep_only_best, write_report

    best_number = int((best[0] if isinstance(best, list) else best).run_id)
    written = write_report(study, output_dir, best_number)
    if keep_best_trial_only:
        removed = keep_only_best(study, best_number)
        logger.info("kept only trial %d's checkpoint; removed %d others", best_number, len(removed))
    logger.info("search results: %s", ", ".join(str(p) for p in written.values()))


__all__ = ["SearchAborted", "SearchConfigError", "TrialFailed", "hyperparameter_search"]
