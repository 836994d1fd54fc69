"""scaletrain: an HF-compatible Trainer whose backends are Strategy objects."""
from .version import __version__
from .args import NotSupportedError, Seq2SeqTrainingArguments, TrainingArguments
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
from .seq2seq import Seq2SeqTrainer
from .trainer import Trainer

__all__ = [
    "__version__", "NotSupportedError", "Seq2SeqTrainingArguments", "TrainingArguments", "Trainer",
    "Seq2SeqTrainer", "DefaultFlowCallback", "EarlyStoppingCallback", "JsonlMetricsCallback", "ProgressCallback",
    "TrainerCallback", "TrainerControl", "TrainerState", "WandbCallback",
]
