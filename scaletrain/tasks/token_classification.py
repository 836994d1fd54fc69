"""token-classification on the user's files (run_ner's recipe): a list of words and a list of tags per
row; each word's tag goes to its first sub-token, the other sub-tokens get -100; entity-level
precision / recall / F1 by seqeval, as run_ner reports them."""
from __future__ import annotations

import numpy as np

from ..args.run_config import ConfigError
from .base import Task, resolve_model_path
from .models import model_builders
from .causal_lm import IGNORE_INDEX
from .user_data import OVERLENGTH, first_present, map_rows, report_truncated, require_columns, source_of

METRICS = ("precision", "recall", "f1", "accuracy")


def _tag_names(splits, column: str, data) -> list[str]:
    """Sequence(ClassLabel) names, or the sorted tag strings of the training split (run_ner's
    get_label_list); a validation tag training never saw is an error: its id would not exist."""
    from datasets import ClassLabel, Sequence

    feature = splits["train"].features[column]
    inner = getattr(feature, "feature", None) if isinstance(feature, Sequence) else (
        feature[0] if isinstance(feature, list) and feature else None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    names = sorted({tag for tags in splits["train"][column] for tag in tags})
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"data.tags_column={column!r} holds {sorted({type(n).__name__ for n in names})} without "
                          "tag names; give tag strings (B-PER, O, ...) or a dataset whose column is a ClassLabel")
    for split, ds in splits.items():
        unseen = sorted({t for tags in ds[column] for t in tags} - set(names)) if column in ds.column_names else []
        if unseen:
            raise ConfigError(f"tags {unseen} of the {split} split ({source_of(data, split)}) never appear in "
                              "training; the model would have no class for them")
    return names


def _check_rows(ds, split: str, data, tokens: str, tags: str) -> None:
    tag_rows = ds[tags] if tags in ds.column_names else ds[tokens]
    for row, (words, row_tags) in enumerate(zip(ds[tokens], tag_rows, strict=True)):
        if not isinstance(words, list) or not isinstance(row_tags, list):
            raise ConfigError(f"row {row} of the {split} split ({source_of(data, split)}): data.tokens_column and "
                              "data.tags_column must hold lists (one entry per word)")
        if len(words) != len(row_tags):
            raise ConfigError(f"row {row} of the {split} split ({source_of(data, split)}) has {len(words)} words "
                              f"but {len(row_tags)} tags; give one tag per word")


def seqeval_metrics(names: list[str]):
    try:
        import seqeval.metrics  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("task token-classification reports seqeval's entity F1: pip install "
                                  "'scaletrain[tasks]' (or pip install seqeval)") from None
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    def compute(eval_pred) -> dict[str, float]:
        preds = np.asarray(eval_pred.predictions).argmax(-1)
        true, predicted = _aligned(preds, np.asarray(eval_pred.label_ids), names)
        return {"precision": float(precision_score(true, predicted)), "recall": float(recall_score(true, predicted)),
                "f1": float(f1_score(true, predicted)), "accuracy": float(accuracy_score(true, predicted))}

    return compute


def _aligned(preds, labels, names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Tag names at the labelled (first sub-token) positions only."""
    true, predicted = [], []
    for row_preds, row_labels in zip(preds, labels, strict=True):
        keep = row_labels != IGNORE_INDEX
        true.append([names[i] for i in row_labels[keep]])
        predicted.append([names[i] for i in row_preds[keep]])
    return true, predicted


def build_token_classification_task(cfg, splits) -> Task:
    from transformers import AutoTokenizer, DataCollatorForTokenClassification

    data = cfg.data
    tokens = data.tokens_column or first_present(splits, ("tokens", "words")) or "tokens"
    tags = data.tags_column or first_present(splits, ("ner_tags", "tags", "labels", "pos_tags")) or "ner_tags"
    require_columns(splits, data, {"tokens_column": tokens})
    require_columns({k: v for k, v in splits.items() if k != "test"}, data, {"tags_column": tags})
    for split, ds in splits.items():
        _check_rows(ds, split, data, tokens, tags)
    names = _tag_names(splits, tags, data)
    tag_id = {n: i for i, n in enumerate(names)}
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ConfigError(f"model {cfg.model.name_or_path!r} has no fast tokenizer; token-classification needs "
                          "its word ids to align tags with sub-tokens")
    load, from_config = model_builders(cfg, path, tokenizer, num_labels=len(names),
                                       id2label=dict(enumerate(names)), label2id=tag_id)

    def encode(batch):
        out = tokenizer(batch[tokens], is_split_into_words=True, truncation=True, max_length=data.max_length)
        full = tokenizer(batch[tokens], is_split_into_words=True)["input_ids"]
        out[OVERLENGTH] = [len(ids) > data.max_length for ids in full]
        if tags in batch:
            out["labels"] = [_first_subtoken_labels(out.word_ids(i), row, tag_id)
                             for i, row in enumerate(batch[tags])]
        return out

    encoded = {split: report_truncated(map_rows(ds, encode, data, ds.column_names, f"tokenizing {split}"), split,
                                       data.max_length, "max_length") for split, ds in splits.items()}

    def decode(predictions, split: str) -> list[dict]:
        preds = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions).argmax(-1)
        words = splits[split][tokens]
        word_ids = [tokenizer(row, is_split_into_words=True, truncation=True, max_length=data.max_length).word_ids()
                    for row in words]
        return [{"tags": _word_tags(p, ids, names)} for p, ids in zip(preds, word_ids, strict=True)]

    return Task(load, from_config, tokenizer, encoded["train"], encoded.get("validation"), seqeval_metrics(names),
                names, data_collator=DataCollatorForTokenClassification(tokenizer), metric_names=METRICS,
                test_dataset=encoded.get("test"), decode_predictions=decode)


def _first_subtoken_labels(word_ids: list, row_tags: list, tag_id: dict) -> list[int]:
    labels, previous = [], None
    for word in word_ids:
        first = word is not None and word != previous
        labels.append((row_tags[word] if isinstance(row_tags[word], int) else tag_id[row_tags[word]]) if first
                      else IGNORE_INDEX)
        previous = word
    return labels


def _word_tags(row_preds, word_ids: list, names: list[str]) -> list[str]:
    """One predicted tag per word (its first sub-token's); words cut off by max_length get none."""
    tags, previous = [], None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            tags.append(names[int(row_preds[position])])
        previous = word
    return tags
