"""A fine-tuning script in the style of HF's examples (run_glue.py), in our own words.

It is written for transformers.Trainer; TRAINER_LIBRARY=scaletrain swaps the
import, which is the only change a user makes.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional

import datasets
import numpy as np
from transformers import AutoModelForSequenceClassification, set_seed

from example_common import ModelArguments, parse_arguments, run_stages, setup_logging

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Trainer, TrainingArguments = library.Trainer, library.TrainingArguments


@dataclass
class DataTrainingArguments:
    max_train_samples: Optional[int] = None
    sequence_length: int = 12


def synthetic_rows(n: int, length: int, seed: int) -> datasets.Dataset:
    """A learnable task: the label is whether token 7 occurs in the row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, size=(n, length))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "label": (ids == 7).any(axis=1).astype(int).tolist()})


def main() -> None:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataTrainingArguments, TrainingArguments))
    setup_logging(training_args)
    set_seed(training_args.seed)

    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path)
    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw = synthetic_rows(96, data_args.sequence_length, seed=0).train_test_split(test_size=32, seed=0)
        processed = raw.map(lambda row: {"attention_mask": [1] * len(row["input_ids"])})
    train_dataset, eval_dataset = processed["train"], processed["test"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(data_args.max_train_samples))

    def compute_metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train else None,
                      eval_dataset=eval_dataset if training_args.do_eval else None, compute_metrics=compute_metrics)
    run_stages(trainer, training_args, train_dataset, eval_dataset, model_args.model_name_or_path,
               "text-classification")


if __name__ == "__main__":
    main()
