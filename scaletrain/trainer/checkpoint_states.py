"""What a training checkpoint holds besides model and optimizer state, and how it is restored."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState

from ..checkpoint.hf_weights import write_adapter_weights, write_hf_weights

from ..checkpoint.compatibility import model_fingerprint
from ..modeling import adapter_config, model_class_name, tied_copy_names
from ..parallel.pipeline_runtime import pipeline_of
from .progress import TrainProgress
from .resume import PROGRESS_FILE

TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"


class TrainerStateFile:
    """HF's TrainerState (log history, best metric, ...) as a Stateful object,
    written in the same JSON as TrainerState.save_to_json; loading updates it in place."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, value in dataclasses.asdict(TrainerState(**saved)).items():
            setattr(self.state, name, value)


class ProgressFile:
    """TrainProgress plus what belongs to other owners but must be restored with the position:
    the middleware's state and the strategy's precision (the fp16 loss scale)."""

    def __init__(self, progress: TrainProgress, middleware, precision) -> None:
        self.progress, self.middleware, self.precision = progress, middleware, precision

    def state_dict(self) -> dict[str, Any]:
        self.progress.middleware = self.middleware.state_dict()
        return {**self.progress.state_dict(), "precision": self.precision.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.progress.load_state_dict(saved)
        self.middleware.load_state_dict(self.progress.middleware)
        # checkpoints written while precision was middleware keep the scaler under its name
        self.precision.load_state_dict(saved.get("precision") or self.progress.middleware.get("mixed_precision", {}))


def training_states(trainer_state: TrainerState, progress: Optional[ProgressFile], scheduler, with_scheduler: bool
                    ) -> dict[str, Any]:
    """The Stateful objects of a training checkpoint, by file name (progress: None when a
    resume has read it already)."""
    states: dict[str, Any] = {TRAINER_STATE_FILE: TrainerStateFile(trainer_state)}
    if progress is not None:
        states[PROGRESS_FILE] = progress
    if with_scheduler and scheduler is not None:
        states[SCHEDULER_FILE] = scheduler
    return states


def manifest_extra(model) -> dict[str, Any]:
    """What a resume or an export checks the model against. `model` is unwrapped."""
    adapter = adapter_config(model)
    return {"model_fingerprint": model_fingerprint(model, model_class_name(model)),
            "base_model": adapter.base_model_name_or_path if adapter is not None else None,
            "model_class": model_class_name(model)}


def model_files_writer(model, processing_class: Optional[Any], args: Any = None):
    """Config, tokenizer and training arguments (HF's training_args.bin) beside the state, so `scaletrain
    export` needs nothing else and HF's tooling finds its files. An adapted (LoRA) model adds its adapter
    config, which names the base model the frozen weights come from."""
    def write(folder: Path) -> None:
        if args is not None:
            torch.save(args, folder / TRAINING_ARGS_NAME)
        adapter = adapter_config(model)
        if adapter is not None:
            adapter.save_pretrained(str(folder))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(folder))
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(str(folder))
    return write


def adapter_keys_of_every_stage(strategy, model, trainable: set[str]) -> dict[str, str]:
    """peft's adapter-file key of every pipeline stage's trained tensors: each rank asks peft about the layers its
    stages hold (peft finds the keys structurally, from the model's own layers), and the answers are gathered."""
    from peft import get_peft_model_state_dict

    markers = {name: torch.empty(0) for name in trainable}  # peft passes the tensors through: matched by identity
    key_of = {id(tensor): key for key, tensor in get_peft_model_state_dict(model, state_dict=markers).items()}
    mine = {name: key_of[id(tensor)] for name, tensor in markers.items() if id(tensor) in key_of}
    return {name: key for part in strategy.all_gather_object(mine) for name, key in part.items()}


def hf_weights_writer(strategy, model_wrapped, model):
    """The checkpoint's model in HF's layout, written by every rank: the full weights (model.safetensors,
    sharded with an index when large), or a LoRA model's adapter (adapter_model.safetensors). `model` is
    unwrapped."""
    def write(folder: Path) -> None:
        if adapter_config(model) is not None:
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            keys = adapter_keys_of_every_stage(strategy, model, trainable) if pipeline_of(model) else None
            write_adapter_weights(folder, model, strategy.full_model_tensors(model_wrapped, trainable),
                                  strategy.writes_files, keys)
        else:
            write_hf_weights(folder, strategy.full_model_tensors(model_wrapped), strategy.writes_files,
                             skip=frozenset(tied_copy_names(model)))
    return write
