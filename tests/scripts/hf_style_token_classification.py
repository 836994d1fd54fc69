"""Token classification (NER-style tags) in the style of HF's run_ner.py, in our own words: words
and their tags, tokenized with is_split_into_words and the tags aligned to the first token of each
word (-100 elsewhere), padded by DataCollatorForTokenClassification, scored by token accuracy.

Written for transformers.Trainer; TRAINER_LIBRARY=scaletrain swaps the import."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import datasets
import numpy as np
from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, set_seed

from example_common import (
    ModelArguments, parse_arguments, run_stages, setup_logging, synthetic_sentences, token_accuracy,
)

library = importlib.import_module(os.environ.get("TRAINER_LIBRARY", "transformers"))
Trainer, TrainingArguments = library.Trainer, library.TrainingArguments
TAGS = ["O", "B-LOW", "B-HIGH"]


@dataclass
class DataTrainingArguments:
    words_per_sentence: int = 6


def tagged_sentences(n: int, words: int, seed: int) -> datasets.Dataset:
    """A word's tag follows from the word itself: w5-w9 are LOW, w35-w39 HIGH, the rest O."""
    tokens = [sentence.split() for sentence in synthetic_sentences(n, words, seed)]
    tags = [[1 if int(w[1:]) < 10 else 2 if int(w[1:]) >= 35 else 0 for w in row] for row in tokens]
    return datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags})


def main() -> None:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataTrainingArguments, TrainingArguments))
    setup_logging(training_args)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForTokenClassification.from_pretrained(model_args.model_name_or_path)

    def tokenize_and_align_labels(examples: dict) -> dict:
        tokenized = tokenizer(examples["tokens"], is_split_into_words=True)
        labels = []
        for i, tags in enumerate(examples["ner_tags"]):
            previous, row = None, []
            for word in tokenized.word_ids(batch_index=i):
                row.append(-100 if word is None or word == previous else tags[word])
                previous = word
            labels.append(row)
        tokenized["labels"] = labels
        return tokenized

    raw = tagged_sentences(96, data_args.words_per_sentence, seed=2).train_test_split(0.25, seed=0)
    with training_args.main_process_first(desc="dataset map tokenization"):
        processed = raw.map(tokenize_and_align_labels, batched=True, remove_columns=["tokens", "ner_tags"])
    train_dataset, eval_dataset = processed["train"], processed["test"]

    def compute_metrics(p):
        return token_accuracy(np.argmax(p.predictions, axis=2), p.label_ids)

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
                      compute_metrics=compute_metrics)
    run_stages(trainer, training_args, train_dataset, eval_dataset, model_args.model_name_or_path,
               "token-classification")


if __name__ == "__main__":
    main()
