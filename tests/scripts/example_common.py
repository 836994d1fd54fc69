"""What every HF example-style script here shares, in the order HF's examples do it: parse the
three argument dataclasses (command line or a JSON/YAML file), set up logging per process, then
train / evaluate / predict and write the metrics, state and model card."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import transformers
from transformers import HfArgumentParser

logger = logging.getLogger("example")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a local HF folder: the model, and its tokenizer where needed"})


def parse_arguments(dataclass_types: tuple) -> tuple:
    parser = HfArgumentParser(dataclass_types)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def setup_logging(training_args) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(f"process rank: {training_args.process_index}, device: {training_args.device}, "
                   f"n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value}")


def run_stages(trainer, training_args, train_dataset, eval_dataset, finetuned_from: str, task: str,
               perplexity: bool = False) -> None:
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        if perplexity:  # as HF's language-modeling examples report it
            metrics["perplexity"] = float(np.exp(min(metrics["eval_loss"], 50.0)))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        output = trainer.predict(eval_dataset, metric_key_prefix="predict")
        trainer.log_metrics("predict", output.metrics)
        trainer.save_metrics("predict", output.metrics)
        if trainer.is_world_process_zero():
            predictions = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
            rows = predictions.argmax(-1) if predictions.dtype.kind == "f" else predictions
            Path(training_args.output_dir, "predict_results.txt").write_text(
                "index\tprediction\n" + "".join(f"{i}\t{np.asarray(row).tolist()}\n" for i, row in enumerate(rows)))
    trainer.create_model_card(finetuned_from=finetuned_from, tasks=task)


def synthetic_sentences(n: int, words: int, seed: int) -> list[str]:
    """Learnable text over the fixtures' word vocabulary (w5 .. w39): each sentence steps through
    the words with its own stride, so the next word follows from the previous two."""
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(n):
        start, stride = rng.integers(0, 35), rng.integers(1, 5)
        sentences.append(" ".join(f"w{5 + (start + k * stride) % 35}" for k in range(words)))
    return sentences


def token_accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The share of scored positions (labels != -100) predicted right."""
    valid = labels != -100
    return {"accuracy": float((predictions[valid] == labels[valid]).mean())}


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate the batch's rows and cut them into block_size chunks (the remainder is dropped)."""
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = len(joined["input_ids"]) // block_size * block_size
    return {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
