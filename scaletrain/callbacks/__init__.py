"""Callbacks use the Hugging Face event API, so HF callbacks plug in unchanged."""
from transformers.trainer_callback import (
    DefaultFlowCallback,
    EarlyStoppingCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

from .observers import JsonlMetricsCallback, ProgressCallback, WandbCallback

__all__ = [
    "DefaultFlowCallback", "EarlyStoppingCallback", "TrainerCallback", "TrainerControl", "TrainerState",
    "JsonlMetricsCallback", "ProgressCallback", "WandbCallback",
]
