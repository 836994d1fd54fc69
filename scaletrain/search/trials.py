"""One trial's view for model_init and its arguments: what the trainer builds a trial from."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import optuna

from .errors import SearchConfigError


class ObservedTrial:
    """The trial model_init receives: the optuna trial (or the FixedTrial every rank shares), recording
    which parameters model_init reads, so a sampled name nobody uses is an error, not a silent no-op."""

    def __init__(self, trial: Any, shared: bool) -> None:
        self._trial, self._shared = trial, shared
        self.read: set[str] = set()

    @property
    def params(self) -> dict[str, Any]:
        return _ReadRecordingDict(self._trial.params, self.read)

    @property
    def suggested(self) -> dict[str, Any]:
        """Every parameter drawn so far (by hp_space and model_init), without counting as a read."""
        return dict(self._trial.params)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return attr

        def suggest(param: str, *args, **kwargs):
            self.read.add(param)
            try:
                return attr(param, *args, **kwargs)
            except ValueError as exc:
                if self._shared and param not in self._trial.params:
                    raise SearchConfigError(
                        f"model_init samples {param!r} with trial.{name}, which rank 0 alone would draw; on several "
                        f"ranks sample every parameter in hp_space and read it in model_init as "
                        f"trial.params[{param!r}]") from exc
                raise
        return suggest


class _ReadRecordingDict(dict):
    def __init__(self, values: dict[str, Any], read: set[str]) -> None:
        super().__init__(values)
        self._read = read

    def __getitem__(self, key: str) -> Any:
        self._read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        return super().get(key, default)


class RecordingDict(_ReadRecordingDict):
    """A Ray Tune trial as model_init receives it (the config dict, as under HF), recording which
    parameters model_init reads, like ObservedTrial."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.read: set[str] = set()
        super().__init__(values, self.read)

    @property
    def suggested(self) -> dict[str, Any]:
        return dict(self.items())


def shared_trial(params: dict[str, Any], number: int, hp_space: Callable) -> optuna.trial.FixedTrial:
    """The trial as every rank sees it: a FixedTrial of rank 0's draw, with hp_space replayed on it so its
    `params` hold the suggested values (FixedTrial lists a parameter only once it is suggested)."""
    trial = optuna.trial.FixedTrial(params, number)
    hp_space(trial)
    return trial


def takes_trial(model_init: Callable) -> bool:
    return len(inspect.signature(model_init).parameters) == 1


def argument_names(args: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(args) if f.init}


def check_names(hp_params: dict[str, Any], args: Any, model_init: Callable) -> None:
    """Every sampled name is a TrainingArguments field, or model_init gets the trial to read it."""
    if not hp_params and not takes_trial(model_init):
        raise _empty_space()
    unknown = sorted(set(hp_params) - argument_names(args))
    if unknown and not takes_trial(model_init):
        raise SearchConfigError(
            f"hp_space returns {unknown}, which {'is not a' if len(unknown) == 1 else 'are not'} TrainingArguments "
            f"field{'' if len(unknown) == 1 else 's'}, and model_init takes no trial to read "
            f"{'it' if len(unknown) == 1 else 'them'}; fix the name or define model_init(trial) and read "
            f"trial.params[...]")


def check_reads(hp_params: dict[str, Any], observed: Any, args: Any) -> None:
    """After model_init: names that are neither fields nor read by model_init would change nothing."""
    unused = sorted(set(hp_params) - argument_names(args) - observed.read)
    if unused:
        raise SearchConfigError(
            f"hp_space returns {unused}, which model_init never reads and no TrainingArguments field has that "
            f"name; fix the name, or read it in model_init as trial.params[{unused[0]!r}]")
    if not hp_params and not observed.suggested:
        raise _empty_space()


def read_objective(compute_objective: Callable, metrics: dict[str, float]) -> Any:
    """compute_objective(metrics), with a metric the evaluation does not produce named as such."""
    try:
        return compute_objective(dict(metrics))
    except KeyError as exc:
        raise SearchConfigError(
            f"compute_objective reads {exc}, which the evaluation does not produce (it gives "
            f"{sorted(metrics)}); pick one of those, or make compute_metrics return it") from exc


def _empty_space() -> SearchConfigError:
    return SearchConfigError("the search space is empty: hp_space returned no parameter and model_init sampled "
                             "none; return at least one, e.g. {'learning_rate': trial.suggest_float("
                             "'learning_rate', 1e-5, 1e-3, log=True)}")


def trial_arguments(base: Any, params: dict[str, Any], output_dir: str) -> Any:
    """The base arguments with the trial's values, cast to each field's current type as HF casts them, and
    validated again (a value a field refuses fails this trial)."""
    fields = argument_names(base)
    changes = {}
    for key, value in params.items():
        if key not in fields:
            continue
        old = getattr(base, key)
        retype = old is not None and not isinstance(old, (dict, list, tuple)) and not isinstance(value, type(old))
        changes[key] = type(old)(value) if retype else value
    return dataclasses.replace(base, output_dir=output_dir, **changes)
