"""The Trainer and its parts (see trainer.py for how they fit together)."""
from .step import IGNORE_INDEX
from .trainer import Trainer

__all__ = ["IGNORE_INDEX", "Trainer"]
