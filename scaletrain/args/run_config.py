"""One config tree: dataclasses <- YAML <- command-line overrides.

    task:     text-classification | causal-lm | seq2seq | token-classification
              (default: the built-in dataset's task; required with the user's own files)
    model:    ModelConfig fields
    data:     DataConfig fields
    training: TrainingArguments fields (HF names)
    search:   SearchConfig fields (`scaletrain hpo` only; optional)

Overrides are `--field value` (the field name is unique across sections) or
`--section.field value`. Unknown keys and bad values raise ConfigError naming
the key and the fix, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .training import Seq2SeqTrainingArguments, TrainingArguments
from ..errors import did_you_mean
from ..search.search_section import SearchConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # a local HF folder, or an alias of an offline model package ("minilm")
    name_or_path: str = "minilm"
    # randomly initialise from the checkpoint's config with these overrides
    # (e.g. a tiny model for tests) instead of loading pretrained weights
    config_overrides: Optional[dict] = None
    dropout: Optional[float] = None  # overrides hidden/attention dropout when set
    # seq2seq: an EncoderDecoderModel whose encoder and decoder both start from name_or_path
    # (BERT2BERT, as in HF's warm-starting guide); otherwise name_or_path is a seq2seq model folder
    encoder_decoder: bool = False


@dataclass
class DataConfig:
    # a built-in dataset (trec, sms-spam, moviedialog, gettext-fr); trec when no file or dataset_name is given
    dataset: Optional[str] = None
    label_granularity: Optional[str] = None  # trec: 6 "coarse" (default) or 50 "fine" classes
    max_length: int = 64  # tokens per example (seq2seq: the source)
    eval_size: Optional[int] = None  # built-in datasets: held-out rows (default 1000)
    train_size: Optional[int] = None  # built-in datasets: subsample the training split
    split_seed: int = 0
    # the user's own data, with the HF example scripts' names
    train_file: Optional[str] = None  # csv, json/jsonl, parquet, txt, or a save_to_disk folder
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    dataset_name: Optional[str] = None  # a save_to_disk folder, or a dataset in the local datasets cache
    dataset_config_name: Optional[str] = None
    validation_split_percentage: Optional[int] = None  # no validation file: hold out this % of training rows
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_predict_samples: Optional[int] = None
    preprocessing_num_workers: Optional[int] = None
    text_column: Optional[list[str]] = None  # text-classification: 2 columns make sentence pairs; causal-lm text
    label_column: Optional[str] = None
    source_column: Optional[str] = None  # seq2seq
    target_column: Optional[str] = None
    source_prefix: Optional[str] = None  # e.g. "translate English to French: " for T5
    max_target_length: Optional[int] = None  # seq2seq targets (default max_length)
    tokens_column: Optional[str] = None  # token-classification: a list of words per row
    tags_column: Optional[str] = None  # its list of tags (names or ids)
    messages_column: Optional[str] = None  # causal-lm chat: a list of {role, content}
    prompt_column: Optional[str] = None  # causal-lm instruction pairs
    response_column: Optional[str] = None
    block_size: Optional[int] = None  # causal-lm raw text: tokens per packed block
    pack: bool = False  # causal-lm chat: pack examples into max_length rows without crossing their attention


TASKS = ("text-classification", "causal-lm", "seq2seq", "token-classification")


@dataclass
class RunConfig:
    task: Optional[str] = None  # one of TASKS; settled by build_task when not given
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: Any = None  # TrainingArguments
    search: Optional[SearchConfig] = None  # what `scaletrain hpo` searches; `train` runs the base config

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
               "training": self.training.to_dict()}
        if self.search is not None:
            out["search"] = dataclasses.asdict(self.search)
        return out


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingArguments, "search": SearchConfig}
OPTIONAL_SECTIONS = ("search",)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type (strings from the CLI)."""
    if annotation is Any or annotation is None:
        return value
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, annotation, key)
    if origin in (list, tuple):
        return _coerce_list(value, annotation, key)
    if origin is dict or annotation is dict:
        return _coerce_dict(value, key)
    scalar = _SCALARS.get(annotation)
    return scalar(value, annotation, key) if scalar is not None else value


def _coerce_union(value: Any, annotation: Any, key: str) -> Any:
    """The first member type the value fits; None (or the words none/null) where the union allows it."""
    members = typing.get_args(annotation)
    says_none = isinstance(value, str) and value.lower() in ("none", "null")
    if value is None or (says_none and type(None) in members):
        return None
    for option in (a for a in members if a is not type(None)):
        try:
            return _coerce(value, option, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}={value!r} does not fit {annotation}")


def _coerce_list(value: Any, annotation: Any, key: str) -> list:
    if isinstance(value, str):  # the CLI's spelling: a,b,c
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a list")
    (inner,) = typing.get_args(annotation)[:1] or (Any,)
    return [_coerce(v, inner, key) for v in value]


def _coerce_dict(value: Any, key: str) -> dict:
    if isinstance(value, str):  # the CLI's spelling: a YAML/JSON mapping
        value = yaml.safe_load(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return value


def _coerce_bool(value: Any, _annotation: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key}={value!r} must be true or false")


def _coerce_number(value: Any, annotation: type, key: str) -> Union[int, float]:
    kind = "a number" if annotation is float else "an integer"
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number")
    try:
        number = float(value) if annotation is float else int(str(value), 10) if isinstance(value, str) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be {kind}") from None
    if annotation is int and not isinstance(number, int):
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise ConfigError(f"{key}={value!r} must be an integer")
    return number


def _coerce_str(value: Any, _annotation: Any, key: str) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key}={value!r} must be a string")
    return str(value)


_SCALARS = {bool: _coerce_bool, int: _coerce_number, float: _coerce_number, str: _coerce_str}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    return ConfigError(f"unknown key {key!r} in {where}{did_you_mean(key, known)}")


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped inside the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = resources.files("scaletrain.recipes") / f"{name_or_path}.yaml"
    if recipe.is_file():
        return Path(str(recipe))
    shipped = sorted(p.name[:-5] for p in resources.files("scaletrain.recipes").iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a built-in recipe ({', '.join(shipped)})")


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --learning_rate 1e-4")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {token} has no value")
            value = argv[i + 1]
            i += 2
        pairs.append((key.replace("-", "_") if "." not in key else key, value))
    return pairs


def _task(raw: dict, overrides: list[str], path) -> Optional[str]:
    """The top-level task key (a --task override wins), checked before the sections are built."""
    task = raw.get("task")
    for key, value in parse_overrides(overrides):
        if key == "task":
            task = value
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task!r} in {path} is unknown; choose one of {', '.join(TASKS)}"
                          f"{did_you_mean(str(task), TASKS)}")
    return task


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    _check_top_level(raw, path)
    task = _task(raw, overrides or [], path)
    sections = dict(SECTIONS, training=Seq2SeqTrainingArguments) if task == "seq2seq" else SECTIONS
    values = {name: dict(raw.get(name) or {}) for name in sections}
    types_by_section = {name: _field_types(cls) for name, cls in sections.items()}
    for name, section_values in values.items():
        for key in section_values:
            if key not in types_by_section[name]:
                raise _unknown(key, list(types_by_section[name]), f"{path} section '{name}'")
    for key, value in parse_overrides(overrides or []):
        if key != "task":
            section, fname = _override_target(key, types_by_section)
            values[section][fname] = value
    built = {name: _build_section(name, cls, values[name], types_by_section[name], path)
             for name, cls in sections.items()}
    return RunConfig(task=task, **built)


def _check_top_level(raw: Any, path) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {sorted(SECTIONS)} (and task)")
    for section in raw:
        if section not in SECTIONS and section != "task":
            raise _unknown(section, list(SECTIONS) + ["task"], f"{path} (top-level keys)")


def _override_target(key: str, types_by_section: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(section, field) that --key names: --section.field, or a field name unique across the sections."""
    if "." in key:
        section, _, fname = key.partition(".")
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS), "override sections")
        if fname not in types_by_section[section]:
            raise _unknown(fname, list(types_by_section[section]), f"section '{section}'")
        return section, fname
    owners = [s for s, t in types_by_section.items() if key in t]
    if not owners:
        everything = [k for t in types_by_section.values() for k in t]
        raise _unknown(key, everything, "overrides")
    if len(owners) > 1:
        raise ConfigError(f"--{key} exists in sections {owners}; write --{owners[0]}.{key}")
    return owners[0], key


def _build_section(name: str, cls: type, values: dict[str, Any], field_types: dict[str, Any], path) -> Any:
    """The section's dataclass from its typed values (None for an optional section left out)."""
    if name in OPTIONAL_SECTIONS and not values:
        return None
    kwargs = {k: _coerce(v, field_types[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} section '{name}': {exc}") from exc
