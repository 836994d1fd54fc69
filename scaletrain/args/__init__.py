"""Everything a run is configured by: HF's TrainingArguments (training.py), what they answer about the
running process (process.py), and the YAML + command-line config tree of the CLI (run_config.py)."""
from .training import NotSupportedError, Seq2SeqTrainingArguments, TrainingArguments

__all__ = ["NotSupportedError", "Seq2SeqTrainingArguments", "TrainingArguments"]
