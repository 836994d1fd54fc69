"""Causal language modeling in the style of HF's run_clm.py, in our own words: tokenize, concatenate
and cut into blocks of block_size, train, report perplexity and next-token accuracy.

Written for transformers.Trainer; TRAINER_LIBRARY=scaletrain swaps the import."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

from example_common import (
    ModelArguments, group_texts, parse_arguments, run_stages, setup_logging, synthetic_sentences, token_accuracy,
)

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Trainer, TrainingArguments = library.Trainer, library.TrainingArguments


@dataclass
class DataTrainingArguments:
    block_size: int = field(default=16, metadata={"help": "tokens per training row after grouping"})


def blocks_with_labels(examples: dict, block_size: int) -> dict:
    """Blocks of block_size tokens; the labels are the inputs (the model shifts them)."""
    blocks = group_texts(examples, block_size)
    blocks["labels"] = [list(row) for row in blocks["input_ids"]]
    return blocks


def main() -> None:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataTrainingArguments, TrainingArguments))
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)

    raw = datasets.Dataset.from_dict({"text": synthetic_sentences(96, 6, seed=0)}).train_test_split(0.25, seed=0)
    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized.map(lambda batch: blocks_with_labels(batch, data_args.block_size), batched=True)
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["test"]

    def preprocess_logits_for_metrics(logits, labels):
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(eval_preds):
        predictions, labels = eval_preds
        return token_accuracy(predictions[:, :-1], labels[:, 1:])  # position t predicts token t + 1

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, data_collator=default_data_collator,
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    run_stages(trainer, training_args, train_dataset, eval_dataset, model_args.model_name_or_path, "text-generation",
               perplexity=True)


if __name__ == "__main__":
    main()
