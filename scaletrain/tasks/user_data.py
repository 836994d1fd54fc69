"""The user's own data: files or a saved dataset read into train / validation / test splits, checked
before any process group starts, with the HF example scripts' field names (run_glue, run_clm,
run_translation, run_ner): train_file, validation_file, test_file, dataset_name, max_*_samples,
validation_split_percentage."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..args.run_config import ConfigError
from ..errors import did_you_mean

logger = logging.getLogger(__name__)
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
FILE_FIELDS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
LIMITS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_predict_samples"}


def uses_user_data(data) -> bool:
    return any(getattr(data, f) for f in ("train_file", "validation_file", "test_file", "dataset_name"))


def _builder(path: Path, field: str) -> tuple[str, dict]:
    if path.is_dir():
        return "disk", {}
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"data.{field}={str(path)!r}: unknown file type {path.suffix!r}; use one of "
                          f"{', '.join(sorted(BUILDERS))} or a datasets save_to_disk folder")
    return builder, ({"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {})


def _read_file(path: Path, field: str) -> Any:
    """One split from one file (or a save_to_disk folder holding one split)."""
    import datasets

    if not path.exists():
        raise ConfigError(f"data.{field}={str(path)!r} does not exist; give the path of a csv, json/jsonl, "
                          "parquet or txt file (relative paths start at the working directory)")
    builder, options = _builder(path, field)
    try:
        if builder == "disk":
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                raise ConfigError(f"data.{field}={str(path)!r} is a DatasetDict with splits {list(loaded)}; "
                                  "give it as data.dataset_name instead")
            return loaded
        return datasets.load_dataset(builder, data_files={"split": str(path)}, split="split",
                                     keep_in_memory=True, **options)
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow/pandas parse errors name neither the file nor the field
        raise ConfigError(f"data.{field}={str(path)!r} could not be read as {builder}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def _read_named(data) -> dict[str, Any]:
    """data.dataset_name: a save_to_disk folder, or a dataset already in the local datasets cache."""
    import datasets

    name = data.dataset_name
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").is_file():
            return dict(datasets.load_from_disk(name, keep_in_memory=True))
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            return {"train": datasets.load_from_disk(name, keep_in_memory=True)}
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no hub is reachable; fail fast instead of retrying
        return dict(datasets.load_dataset(name, data.dataset_config_name, keep_in_memory=True))
    except Exception as exc:
        raise ConfigError(f"data.dataset_name={name!r} could not be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); no dataset hub is reachable: give a save_to_disk "
                          "folder or data.train_file") from exc


def load_splits(data) -> dict[str, Any]:
    """{"train", "validation"?, "test"?} Datasets, row-limited, each checked non-empty."""
    if data.dataset_name and (data.train_file or data.validation_file or data.test_file):
        raise ConfigError("data.dataset_name and data.train_file/validation_file/test_file both given; use one")
    if data.dataset_config_name and not data.dataset_name:
        raise ConfigError("data.dataset_config_name is set without data.dataset_name")
    splits = _read_named(data) if data.dataset_name else {
        split: _read_file(Path(getattr(data, field)), field)
        for split, field in FILE_FIELDS.items() if getattr(data, field)}
    if "train" not in splits:
        raise ConfigError(f"no training split: give data.train_file (splits found: {sorted(splits) or 'none'})")
    splits = _hold_out_validation(splits, data)
    for split, limit_field in LIMITS.items():
        limit = getattr(data, limit_field)
        if limit is not None and limit < 1:
            raise ConfigError(f"data.{limit_field}={limit} must be >= 1")
        if limit is not None and split in splits:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
        if split in splits and len(splits[split]) == 0:
            raise ConfigError(f"the {split} split ({source_of(data, split)}) has no rows")
    return splits


def _hold_out_validation(splits: dict[str, Any], data) -> dict[str, Any]:
    percent = data.validation_split_percentage
    if percent is None:
        return splits
    if "validation" in splits:
        raise ConfigError(f"data.validation_split_percentage={percent} is set but a validation split exists "
                          f"({source_of(data, 'validation')}); remove one of them")
    if not 0 < percent < 100:
        raise ConfigError(f"data.validation_split_percentage={percent} must be between 1 and 99")
    parts = splits["train"].train_test_split(test_size=percent / 100, seed=data.split_seed)
    return {**splits, "train": parts["train"], "validation": parts["test"]}


def source_of(data, split: str) -> str:
    field = FILE_FIELDS[split]
    if getattr(data, field):
        return f"data.{field}={getattr(data, field)!r}"
    if split == "validation" and data.validation_split_percentage:
        return f"{data.validation_split_percentage}% of the training rows"
    return f"data.dataset_name={data.dataset_name!r}"


def require_columns(splits: dict[str, Any], data, columns: dict[str, str]) -> None:
    """Every split has each column, {field name: column}; a missing one is named with a close match."""
    for split, ds in splits.items():
        for field, column in columns.items():
            if column not in ds.column_names:
                raise ConfigError(f"column {column!r} (data.{field}) is not in the {split} split "
                                  f"({source_of(data, split)}; columns: {ds.column_names})"
                                  f"{did_you_mean(column, ds.column_names)}; set data.{field} to the right column")


def first_present(splits: dict[str, Any], candidates: tuple[str, ...]) -> Optional[str]:
    """The HF scripts' default column: the first candidate the training split has."""
    return next((c for c in candidates if c in splits["train"].column_names), None)


def map_rows(ds, fn, data, remove: list[str], desc: str):
    """Dataset.map kept in memory: every rank preprocesses the same rows before any process group
    exists, and in-memory results leave no cache files for concurrent ranks to race on."""
    return ds.map(fn, batched=True, remove_columns=remove, keep_in_memory=True, load_from_cache_file=False,
                  num_proc=data.preprocessing_num_workers, desc=desc)


def check_row_values(ds, column: str, split: str, data, kinds: tuple[type, ...], what: str) -> None:
    """No missing value and one Python type per column: a mix of types is a data error, not a class."""
    seen: dict[type, int] = {}
    for row, value in enumerate(ds[column]):
        if value is None:
            raise ConfigError(f"row {row} of the {split} split ({source_of(data, split)}) has no {column!r} "
                              f"(data.{what}); fill it in or drop the row")
        kind = int if isinstance(value, bool) else type(value)
        if not isinstance(value, kinds):
            raise ConfigError(f"row {row} of the {split} split ({source_of(data, split)}): {column!r}={value!r} is "
                              f"a {type(value).__name__}; data.{what} must hold "
                              f"{' or '.join(k.__name__ for k in kinds)}")
        seen.setdefault(kind, row)
    if len(seen) > 1:
        rows = ", ".join(f"{k.__name__} first at row {r}" for k, r in seen.items())
        raise ConfigError(f"column {column!r} of the {split} split ({source_of(data, split)}) mixes types ({rows}); "
                          "make every value the same type")


OVERLENGTH = "_overlength"  # a column the tokenizing functions add: the row was cut at its limit


def report_truncated(ds, split: str, limit: int, field: str):
    """Say once per split how many rows were longer than their limit (they are truncated, not dropped);
    the count travels as a column so it survives multi-process preprocessing."""
    over = sum(ds[OVERLENGTH])
    if over:
        logger.warning("%d of %d %s rows are longer than data.%s=%d tokens and were truncated; raise data.%s to "
                       "keep them whole", over, len(ds), split, field, limit, field)
    return ds.remove_columns(OVERLENGTH)
