"""Sequence-to-sequence fine-tuning in the style of HF's run_translation.py / run_summarization.py,
in our own words: source and target texts (the target is the source reversed), tokenized with
text_target, padded by DataCollatorForSeq2Seq, evaluated by generation (predict_with_generate)
and exact match of the decoded texts.

Written for transformers.Seq2SeqTrainer; TRAINER_LIBRARY=scaletrain swaps the import."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import datasets
import numpy as np
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from example_common import ModelArguments, parse_arguments, run_stages, setup_logging, synthetic_sentences

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Seq2SeqTrainer, Seq2SeqTrainingArguments = library.Seq2SeqTrainer, library.Seq2SeqTrainingArguments


@dataclass
class DataTrainingArguments:
    max_source_length: int = 12
    max_target_length: int = 12


def main() -> None:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)

    sources = synthetic_sentences(96, 5, seed=3)
    pairs = {"source": sources, "target": [" ".join(reversed(s.split())) for s in sources]}
    raw = datasets.Dataset.from_dict(pairs).train_test_split(0.25, seed=0)

    def preprocess(examples: dict) -> dict:
        return tokenizer(examples["source"], text_target=examples["target"], max_length=data_args.max_source_length,
                         truncation=True)

    with training_args.main_process_first(desc="dataset map tokenization"):
        processed = raw.map(preprocess, batched=True, remove_columns=["source", "target"])
    train_dataset, eval_dataset = processed["train"], processed["test"]

    def compute_metrics(eval_preds):
        predictions, labels = eval_preds
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        expected = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"exact_match": float(np.mean([p.strip() == e.strip() for p, e in zip(decoded, expected, strict=True)]))}

    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics)
    run_stages(trainer, training_args, train_dataset, eval_dataset, model_args.model_name_or_path, "translation")


if __name__ == "__main__":
    main()
