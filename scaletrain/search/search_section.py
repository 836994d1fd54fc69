"""The YAML `search:` section of `scaletrain hpo`: the space, objective, sampler, pruner and storage,
checked against the training section and the task before any process group starts."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..errors import did_you_mean
from .errors import SearchConfigError
from .names import PRUNERS, SAMPLERS

_KINDS = ("float", "int", "categorical")
# dict-valued training fields whose keys a parameter may name ("lora.r")
_DICT_FIELDS = ("lora", "quantization", "lr_scheduler_kwargs", "activation_checkpointing_kwargs")


@dataclass
class SearchConfig:
    # name -> {type: float|int|categorical, low, high, log, step, choices}; a list is shorthand for
    # categorical choices. Names: a training field (learning_rate), a key of a dict field (lora.r),
    # or a model section field (model.dropout)
    parameters: dict = field(default_factory=dict)
    n_trials: int = 10
    metric: Union[str, list] = "eval_loss"  # the objective; a list (with a list of directions): several
    direction: Union[str, list] = "minimize"
    sampler: Union[str, dict] = "tpe"  # a name, or {name: ..., seed: ..., other constructor arguments}
    pruner: Union[None, str, dict] = None  # median, successive_halving, hyperband, ...; none (no pruning) by default
    storage: Optional[str] = None  # sqlite:///OUT/study.db (resumable, shared by several jobs) or a journal file
    study_name: Optional[str] = None
    timeout: Optional[float] = None  # seconds; the search stops starting trials after it
    keep_best_trial_only: bool = False  # delete every checkpoint but the best trial's best one
    heartbeat_interval: int = 60  # with a database storage: a killed job's trial is retried once its
    grace_period: Optional[int] = None  # heartbeat is older than grace_period (default 2x the interval)

    def __post_init__(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise SearchConfigError(f"search.n_trials={self.n_trials!r} must be a positive integer")
        if not self.parameters:
            raise SearchConfigError("search.parameters is empty: name at least one, e.g. learning_rate: "
                                    "{type: float, low: 1.0e-5, high: 1.0e-3, log: true}")
        self.parameters = {name: _spec(name, value) for name, value in self.parameters.items()}
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        directions = self.direction if isinstance(self.direction, list) else [self.direction]
        if len(metrics) != len(directions):
            raise SearchConfigError(f"search.metric has {len(metrics)} entries and search.direction "
                                    f"{len(directions)}; give one direction per metric")
        _check_name("search.sampler", self.sampler, SAMPLERS)
        if self.pruner is not None:
            _check_name("search.pruner", self.pruner, PRUNERS)

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    def check(self, training_args: Any, model_fields: list[str]) -> None:
        """What can be wrong before the task is built: names, grid, pruning without evaluation."""
        fields = {f.name for f in dataclasses.fields(training_args) if f.init}
        for name in self.parameters:
            _check_target(name, fields, model_fields)
        eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
        if self.pruner not in (None, "none") and eval_strategy == "no":
            raise SearchConfigError("search.pruner decides on the evaluations during training, but "
                                    "training.eval_strategy is 'no'; set it to steps (with eval_steps) or epoch")
        if _name_of(self.sampler) == "grid":
            self.grid()  # every parameter needs a finite set of values

    def check_metrics(self, task_metrics: list[str]) -> None:
        """The objective must be something evaluation produces: eval_loss or the task's metrics."""
        available = ["eval_loss"] + [f"eval_{m}" for m in task_metrics]
        for metric in self.metrics:
            if metric not in available:
                raise SearchConfigError(f"search.metric={metric!r}: evaluation never produces it (it gives "
                                        f"{available}){did_you_mean(metric, available)}")

    def grid(self) -> dict[str, list]:
        space = {}
        for name, spec in self.parameters.items():
            if spec["type"] == "categorical":
                space[name] = list(spec["choices"])
            elif spec["type"] == "int" and not spec.get("log"):
                space[name] = list(range(spec["low"], spec["high"] + 1, spec.get("step") or 1))
            else:
                raise SearchConfigError(f"search.sampler grid needs a finite set of values per parameter; give "
                                        f"{name} type: categorical with choices: [...]")
        return space

    def grid_size(self) -> int:
        return len(list(itertools.product(*self.grid().values())))

    def sampler_spec(self) -> Union[str, dict]:
        if _name_of(self.sampler) != "grid":
            return self.sampler
        extra = self.sampler if isinstance(self.sampler, dict) else {"name": "grid"}
        return {**extra, "search_space": self.grid()}

    def hp_space(self, training_args: Any) -> Callable:
        """HF's hp_space(trial) for these parameters: training values in the returned dict (dict fields
        merged into the configured dict), model-section ones left in trial.params for model_init."""
        parameters = dict(self.parameters)

        def hp_space(trial) -> dict[str, Any]:
            values: dict[str, Any] = {}
            for name, spec in parameters.items():
                value = _suggest(trial, name, spec)
                target, _, key = name.partition(".")
                if target == "model":
                    continue
                if target == "training":
                    target, _, key = key.partition(".")
                if key:
                    merged = values.setdefault(target, dict(_as_dict(getattr(training_args, target))))
                    merged[key] = value
                else:
                    values[target] = value
            return values
        return hp_space

    def optuna_kwargs(self) -> dict[str, Any]:
        """hyperparameter_search's keyword arguments."""
        # no pruner means none here (optuna alone would default to its MedianPruner)
        kwargs = {"sampler": self.sampler_spec(), "pruner": self.pruner or "none", "storage": self.storage,
                  "study_name": self.study_name, "timeout": self.timeout, "show_progress_bar": True,
                  "keep_best_trial_only": self.keep_best_trial_only, "heartbeat_interval": self.heartbeat_interval,
                  "grace_period": self.grace_period}
        if self.storage is not None:
            kwargs["load_if_exists"] = True  # the same command continues the study
        return kwargs


def _spec(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict) or value.get("type") not in _KINDS:
        raise SearchConfigError(f"search.parameters.{name}: give type ({'|'.join(_KINDS)}) with low/high "
                                f"(float, int) or choices (categorical); got {value!r}")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}[value["type"]]
    extra = sorted(set(value) - allowed)
    if extra:
        raise SearchConfigError(f"search.parameters.{name}: {extra} do not apply to type {value['type']} "
                                f"(it takes {sorted(allowed - {'type'})})")
    if value["type"] == "categorical":
        if not value.get("choices"):
            raise SearchConfigError(f"search.parameters.{name}: categorical needs a non-empty choices list")
        return value
    if "low" not in value or "high" not in value:
        raise SearchConfigError(f"search.parameters.{name}: type {value['type']} needs low and high")
    number = float if value["type"] == "float" else int
    try:
        value = {**value, "low": number(value["low"]), "high": number(value["high"])}
    except (TypeError, ValueError):
        raise SearchConfigError(f"search.parameters.{name}: low and high must be {number.__name__}s") from None
    if value["low"] > value["high"] or (value.get("log") and value["low"] <= 0):
        raise SearchConfigError(f"search.parameters.{name}: needs low <= high (and low > 0 with log: true); got "
                                f"low={value['low']}, high={value['high']}")
    return value


def _suggest(trial, name: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    suggest = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
    return suggest(name, spec["low"], spec["high"], log=bool(spec.get("log", False)), step=spec.get("step"))


def _check_target(name: str, fields: set[str], model_fields: list[str]) -> None:
    section, _, rest = name.partition(".")
    if section == "model":
        if rest not in model_fields or rest == "name_or_path":
            raise SearchConfigError(f"search.parameters.{name}: the model section has no tunable field {rest!r} "
                                    f"(it has {[f for f in model_fields if f != 'name_or_path']})")
        return
    if section == "data":
        raise SearchConfigError(f"search.parameters.{name}: data is prepared once for every trial; tune training "
                                "or model fields")
    target, _, key = (rest if section == "training" else name).partition(".")
    if key and target not in _DICT_FIELDS:
        raise SearchConfigError(f"search.parameters.{name}: only the keys of {list(_DICT_FIELDS)} can be tuned "
                                "one by one")
    if target not in fields:
        raise SearchConfigError(f"search.parameters.{name}: {target!r} is not a training field nor model.<field>"
                                f"{did_you_mean(target, sorted(fields))}")


def _check_name(where: str, spec: Any, table: dict[str, str]) -> None:
    name = _name_of(spec)
    if name not in table:
        raise SearchConfigError(f"{where}={spec!r}: choose one of {', '.join(sorted(table))} (or a mapping with "
                                "name and the constructor's arguments)")


def _name_of(spec: Any) -> Optional[str]:
    return spec.get("name") if isinstance(spec, dict) else spec


def _as_dict(value: Any) -> dict:
    if isinstance(value, str):
        import json

        return json.loads(value)
    return dict(value or {})


def model_values(search: Optional[SearchConfig], trial: Any) -> dict[str, Any]:
    """The model-section values a trial draws (model.dropout -> {"dropout": ...}); none outside a trial."""
    if search is None or trial is None:
        return {}
    return {name.split(".", 1)[1]: trial.params[name] for name in search.parameters if name.startswith("model.")}
