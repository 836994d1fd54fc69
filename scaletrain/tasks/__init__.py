"""Built-in tasks: real offline models and datasets wired to the config tree."""
from __future__ import annotations

from .text_classification import Task, build_model_on_meta, build_task, resolve_model_path

__all__ = ["Task", "build_model_on_meta", "build_task", "resolve_model_path"]
