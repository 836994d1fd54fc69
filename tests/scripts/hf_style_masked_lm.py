"""Masked language modeling in the style of HF's run_mlm.py, in our own words: tokenize, group into
blocks, mask 15% of the tokens per batch (DataCollatorForLanguageModeling), report perplexity and the
accuracy on masked tokens.

Written for transformers.Trainer; TRAINER_LIBRARY=scaletrain swaps the import."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import datasets
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, set_seed

from example_common import (
    ModelArguments, group_texts, parse_arguments, run_stages, setup_logging, synthetic_sentences, token_accuracy,
)

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Trainer, TrainingArguments = library.Trainer, library.TrainingArguments


@dataclass
class DataTrainingArguments:
    max_seq_length: int = 16
    mlm_probability: float = 0.15


def main() -> None:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataTrainingArguments, TrainingArguments))
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)

    raw = datasets.Dataset.from_dict({"text": synthetic_sentences(96, 6, seed=1)}).train_test_split(0.25, seed=0)
    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw.map(lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True), batched=True,
                            remove_columns=["text"])
    with training_args.main_process_first(desc="grouping texts together"):
        grouped = tokenized.map(lambda batch: group_texts(batch, data_args.max_seq_length), batched=True)
    train_dataset, eval_dataset = grouped["train"], grouped["test"]

    def preprocess_logits_for_metrics(logits, labels):
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)

    def compute_metrics(eval_preds):
        predictions, labels = eval_preds
        return token_accuracy(predictions, labels)  # labels are -100 except at the masked tokens

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=data_args.mlm_probability)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    run_stages(trainer, training_args, train_dataset, eval_dataset, model_args.model_name_or_path, "fill-mask",
               perplexity=True)


if __name__ == "__main__":
    main()
