"""The optuna side of a search: samplers and pruners by name, storages that survive a killed job, and what
counts as a finished trial when a study is resumed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import optuna
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .errors import SearchConfigError
from .names import PRUNERS, SAMPLERS

# a storage URL with a scheme is an optuna RDB; anything else names a journal file
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def _named(kind: str, spec: Union[str, dict], table: dict[str, str], module) -> Any:
    """An optuna sampler or pruner from a name, or {name: ..., **constructor kwargs}."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and "name" in spec:
        name, kwargs = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise SearchConfigError(f"{kind}={spec!r}: give a name ({', '.join(sorted(table))}) or a mapping "
                                f"with 'name' and the constructor's arguments")
    if name not in table:
        raise SearchConfigError(f"{kind}={name!r} is unknown; choose one of {', '.join(sorted(table))}")
    try:
        return getattr(module, table[name])(**kwargs)
    except (TypeError, ValueError, ImportError) as exc:
        raise SearchConfigError(f"{kind} {name!r} with {kwargs}: {exc}") from exc


def build_sampler(spec: Any) -> Optional[optuna.samplers.BaseSampler]:
    if spec is None or isinstance(spec, optuna.samplers.BaseSampler):
        return spec
    return _named("sampler", spec, SAMPLERS, optuna.samplers)


def build_pruner(spec: Any) -> Optional[optuna.pruners.BasePruner]:
    if spec is None or isinstance(spec, optuna.pruners.BasePruner):
        return spec
    return _named("pruner", spec, PRUNERS, optuna.pruners)


def build_storage(spec: Any, heartbeat_interval: int, grace_period: Optional[int], max_retry: Optional[int]):
    """An RDB URL (sqlite:///out/study.db) becomes an RDBStorage with heartbeats, so a trial whose job was
    killed is marked failed and retried with its parameters; another string names a JournalStorage file
    (shared disk, several jobs at once). Storage objects are used as given."""
    if spec is None or not isinstance(spec, (str, Path)):
        return spec
    text = str(spec)
    if "://" in text:
        scheme = text.split("://", 1)[0].split("+", 1)[0]
        if scheme not in _RDB_SCHEMES:
            raise SearchConfigError(f"storage={text!r}: unknown database scheme {scheme!r}; use sqlite:///PATH, "
                                    f"a postgresql/mysql URL, or a journal file path")
        engine = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else None
        if scheme == "sqlite":
            Path(text.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            text, engine_kwargs=engine, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            failed_trial_callback=RetryFailedTrialCallback(max_retry=max_retry, inherit_intermediate_values=True))
    from optuna.storages.journal import JournalFileBackend

    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(text))


def retried_number(trial: FrozenTrial) -> Optional[int]:
    """The trial this one re-runs (RetryFailedTrialCallback's system attribute; its reader warns as experimental)."""
    return trial.system_attrs.get("failed_trial")


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Trials whose job died and that another trial re-ran with the same parameters."""
    return {n for n in (retried_number(t) for t in trials) if n is not None}


def finished_trials(study: optuna.Study) -> int:
    """Trials that ended for their own reasons: complete, pruned, or failed (a failure a retry replaced
    does not count). A resumed search runs until this reaches n_trials."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    ended = (TrialState.COMPLETE, TrialState.PRUNED)
    return sum(1 for t in trials if t.state in ended or (t.state == TrialState.FAIL and t.number not in retried))


def stop_at(n_trials: int):
    """A Study.optimize callback: several jobs sharing one study stop once it holds n_trials finished ones."""
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if finished_trials(study) >= n_trials:
            study.stop()
    return callback
