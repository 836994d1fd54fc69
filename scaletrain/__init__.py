"""scaletrain: an HF-compatible Trainer whose backends are Strategy objects."""
from .parallel.console import quiet_optional_imports

quiet_optional_imports()  # before the first import of transformers below

from .version import __version__
from .args.training import NotSupportedError, Seq2SeqTrainingArguments, TrainingArguments
from .callbacks import (
    DefaultFlowCallback,
    EarlyStoppingCallback,
    JsonlMetricsCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    WandbCallback,
)
from .trainer.seq2seq_trainer import Seq2SeqTrainer
from .trainer import Trainer

__all__ = [
    "__version__", "NotSupportedError", "Seq2SeqTrainingArguments", "TrainingArguments", "Trainer",
    "Seq2SeqTrainer", "DefaultFlowCallback", "EarlyStoppingCallback", "JsonlMetricsCallback", "ProgressCallback",
    "TrainerCallback", "TrainerControl", "TrainerState", "WandbCallback",
]
