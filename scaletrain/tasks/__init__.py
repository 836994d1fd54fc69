"""Tasks: the model head, preprocessing, collator and metrics for each `task:`, on built-in offline
datasets or on the user's own files."""
from __future__ import annotations

import dataclasses

import torch

from ..args.run_config import ConfigError, DataConfig
from .base import Task, resolve_model_path
from .causal_lm import CAUSAL_DATASETS, build_causal_task, build_file_causal_task
from .models import build_on_meta
from .seq2seq import build_seq2seq_task, gettext_splits
from .text_classification import DATASETS, build_classification_task, build_file_classification_task
from .token_classification import build_token_classification_task
from .user_data import load_splits, uses_user_data

BUILT_IN = {**{name: "text-classification" for name in DATASETS}, **{name: "causal-lm" for name in CAUSAL_DATASETS},
            "gettext-fr": "seq2seq"}
USER_DATA = {"text-classification": build_file_classification_task, "causal-lm": build_file_causal_task,
             "seq2seq": build_seq2seq_task, "token-classification": build_token_classification_task}
_SOURCES = ("train_file", "validation_file", "test_file", "dataset_name", "dataset_config_name",
            "validation_split_percentage", "max_train_samples", "max_eval_samples", "max_predict_samples",
            "preprocessing_num_workers")
_BUILT_IN_FIELDS = ("dataset", "label_granularity", "eval_size", "train_size")
# the data fields each task reads beyond max_length and split_seed
READS = {"text-classification": ("text_column", "label_column"),
         "token-classification": ("tokens_column", "tags_column"),
         "causal-lm": ("text_column", "block_size", "messages_column", "prompt_column", "response_column", "pack"),
         "seq2seq": ("source_column", "target_column", "source_prefix", "max_target_length")}


def _set_fields(data: DataConfig) -> set[str]:
    defaults = DataConfig()
    return {f.name for f in dataclasses.fields(DataConfig) if getattr(data, f.name) != getattr(defaults, f.name)}


def settle_task(cfg) -> None:
    """Fill in cfg.task and the built-in dataset, and refuse data fields this run would not read."""
    data, given = cfg.data, _set_fields(cfg.data)
    if uses_user_data(data):
        if data.dataset:
            raise ConfigError(f"data.dataset={data.dataset!r} is a built-in dataset, but data.train_file/"
                              "dataset_name are given too; remove one")
        if cfg.task is None:
            raise ConfigError("the user's own data needs a top-level task: key (text-classification, causal-lm, "
                              "seq2seq or token-classification)")
        readable = set(_SOURCES) | set(READS[cfg.task]) | {"max_length", "split_seed"}
    else:
        data.dataset = data.dataset or "trec"
        if data.dataset not in BUILT_IN:
            raise ConfigError(f"data.dataset={data.dataset!r} is not a built-in dataset ({', '.join(BUILT_IN)}); "
                              "for your own data give data.train_file")
        task = BUILT_IN[data.dataset]
        if cfg.task not in (None, task):
            raise ConfigError(f"task={cfg.task!r} but data.dataset={data.dataset!r} is a {task} dataset; give "
                              "data.train_file for your own data or remove task")
        cfg.task = task
        data.eval_size = 1000 if data.eval_size is None else data.eval_size
        readable = set(_BUILT_IN_FIELDS) | {"max_length", "split_seed"}
        readable |= {"source_prefix", "max_target_length"} if task == "seq2seq" else set()
        if data.label_granularity and data.dataset != "trec":
            raise ConfigError(f"data.label_granularity applies to the trec dataset, not {data.dataset!r}")
    unread = sorted(given - readable)
    if unread:
        raise ConfigError(f"data.{unread[0]} does not apply to task {cfg.task} with "
                          f"{'your own data' if uses_user_data(data) else 'a built-in dataset'}; remove it "
                          f"(fields read here: {', '.join(sorted(readable))})")


def build_task(cfg) -> Task:
    """Model, tokenizer and tokenized datasets for a RunConfig (checked before any process group)."""
    settle_task(cfg)
    if uses_user_data(cfg.data):
        return USER_DATA[cfg.task](cfg, load_splits(cfg.data))
    if cfg.data.dataset in CAUSAL_DATASETS:
        return build_causal_task(cfg)
    if cfg.data.dataset == "gettext-fr":
        return build_seq2seq_task(cfg, gettext_splits(cfg.data))
    return build_classification_task(cfg)


def model_shape_from_config(cfg):
    """The configured model's ModelShape (estimator input), built on the meta device, and its class name."""
    from ..performance.estimate import ModelShape

    model = build_model_on_meta(cfg)
    return ModelShape.of(model), type(model).__name__


def build_model_on_meta(cfg) -> torch.nn.Module:
    """The configured architecture without weights or memory (for estimates)."""
    settle_task(cfg)
    return build_on_meta(cfg, resolve_model_path(cfg.model.name_or_path))


__all__ = ["Task", "build_model_on_meta", "build_task", "model_shape_from_config", "resolve_model_path",
           "settle_task"]
