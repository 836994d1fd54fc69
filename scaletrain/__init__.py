"""scaletrain: an HF-compatible Trainer whose backends are Strategy objects."""
__version__ = "0.1.0"

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
