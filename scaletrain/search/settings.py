"""hyperparameter_search's keyword arguments, checked before any trial: what goes to optuna.create_study,
what to Study.optimize, and scaletrain's own options."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import optuna

from ..errors import NotSupportedError
from .errors import SearchConfigError
from .study import build_pruner, build_sampler, build_storage

_CREATE_STUDY = ("storage", "sampler", "pruner", "study_name", "load_if_exists")
_OPTIMIZE = ("timeout", "n_jobs", "catch", "callbacks", "gc_after_trial", "show_progress_bar")
# scaletrain's own: heartbeats of an RDB storage (a killed job's trial is retried once stale),
# and dropping every checkpoint but the best trial's best one at the end
_OWN = ("heartbeat_interval", "grace_period", "max_retry", "keep_best_trial_only")


@dataclass
class SearchSettings:
    directions: list[str]
    sampler: Optional[optuna.samplers.BaseSampler] = None
    pruner: Optional[optuna.pruners.BasePruner] = None
    storage: Any = None
    study_name: Optional[str] = None
    load_if_exists: bool = False
    timeout: Optional[float] = None
    catch: tuple = ()
    callbacks: list = field(default_factory=list)
    gc_after_trial: bool = False
    show_progress_bar: bool = False
    keep_best_trial_only: bool = False

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1

    @classmethod
    def from_kwargs(cls, direction: Union[str, list[str]], kwargs: dict[str, Any], eval_strategy: str,
                    ) -> "SearchSettings":
        unknown = sorted(set(kwargs) - set(_CREATE_STUDY + _OPTIMIZE + _OWN))
        if unknown:
            raise TypeError(f"hyperparameter_search got unknown keyword arguments {unknown}; it takes "
                            f"optuna.create_study's {list(_CREATE_STUDY)}, Study.optimize's {list(_OPTIMIZE)} "
                            f"and scaletrain's {list(_OWN)}")
        if kwargs.get("n_jobs", 1) != 1:
            raise NotSupportedError(
                f"n_jobs={kwargs['n_jobs']}: trials in threads of one process would share its process group and "
                "model; run several jobs on one study instead (the same storage and study_name in each)")
        directions = list(direction) if isinstance(direction, (list, tuple)) else [direction]
        bad = [d for d in directions if d not in ("minimize", "maximize")]
        if bad or not directions:
            raise SearchConfigError(f"direction={direction!r}: each direction is 'minimize' or 'maximize'")
        settings = cls(
            directions=directions, sampler=build_sampler(kwargs.get("sampler")),
            pruner=build_pruner(kwargs.get("pruner")),
            storage=build_storage(kwargs.get("storage"), kwargs.get("heartbeat_interval", 60),
                                  kwargs.get("grace_period"), kwargs.get("max_retry")),
            study_name=kwargs.get("study_name"), load_if_exists=kwargs.get("load_if_exists", False),
            timeout=kwargs.get("timeout"), catch=_as_tuple(kwargs.get("catch", ())),
            callbacks=list(kwargs.get("callbacks") or []), gc_after_trial=kwargs.get("gc_after_trial", False),
            show_progress_bar=kwargs.get("show_progress_bar", False),
            keep_best_trial_only=kwargs.get("keep_best_trial_only", False),
        )
        settings._check_pruning(str(getattr(eval_strategy, "value", eval_strategy)))
        return settings

    def _check_pruning(self, eval_strategy: str) -> None:
        if self.pruner is None or isinstance(self.pruner, optuna.pruners.NopPruner):
            return
        name = type(self.pruner).__name__
        if eval_strategy == "no":
            raise SearchConfigError(f"pruner {name} decides on the evaluations during training, but eval_strategy "
                                    "is 'no'; set eval_strategy to 'steps' (with eval_steps) or 'epoch'")
        if self.multi_objective:
            raise SearchConfigError(f"pruner {name}: optuna cannot prune a multi-objective study "
                                    f"(directions {self.directions}); drop the pruner or use one objective")

    def create_study(self) -> optuna.Study:
        single = not self.multi_objective
        return optuna.create_study(
            storage=self.storage, sampler=self.sampler, pruner=self.pruner, study_name=self.study_name,
            direction=self.directions[0] if single else None, directions=None if single else self.directions,
            load_if_exists=self.load_if_exists)


def _as_tuple(catch: Any) -> tuple:
    if isinstance(catch, type):
        return (catch,)
    return tuple(catch or ())
