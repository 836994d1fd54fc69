"""A fine-tuning script in the style of HF's examples (run_glue.py), in our own words.

It is written for transformers.Trainer; TRAINER_LIBRARY=scaletrain swaps the
import, which is the only change a user makes.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import transformers
from transformers import AutoModelForSequenceClassification, HfArgumentParser, set_seed

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Trainer, TrainingArguments = library.Trainer, library.TrainingArguments
logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a local HF folder"})


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
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(f"process rank: {training_args.process_index}, device: {training_args.device}, "
                   f"n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value}")
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
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        output = trainer.predict(eval_dataset, metric_key_prefix="predict")
        trainer.log_metrics("predict", output.metrics)
        trainer.save_metrics("predict", output.metrics)
        if trainer.is_world_process_zero():
            labels = np.argmax(output.predictions, axis=1)
            Path(training_args.output_dir, "predict_results.txt").write_text(
                "index\tprediction\n" + "".join(f"{i}\t{label}\n" for i, label in enumerate(labels)))
    trainer.create_model_card(finetuned_from=model_args.model_name_or_path, tasks="text-classification")


if __name__ == "__main__":
    main()
