"""Observers: they read the trainer's state and logs, never change training."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from transformers.trainer_callback import ProgressCallback as HFProgressCallback
from transformers.trainer_callback import TrainerCallback

_SHOWN = (("loss", "loss", "{:.4f}"), ("learning_rate", "lr", "{:.2e}"),
          ("train_samples_per_second", "samples/s", "{:.1f}"), ("train_tokens_per_second", "tok/s", "{:.0f}"),
          ("train_tflops_per_rank", "TFLOP/s/rank", "{:.3g}"), ("train_mfu", "MFU%", "{:.1f}"))


class ProgressCallback(HFProgressCallback):
    """A tqdm bar on the main rank: loss, lr, samples/s, tokens/s, ETA. Takes the place of HF's
    ProgressCallback (a subclass, so code looking for HF's finds it); evaluation draws no bar of its own,
    its results show in the training bar and the logs."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return None

    def on_evaluate(self, args, state, control, **kwargs):
        return None

    def on_predict(self, args, state, control, **kwargs):
        return None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            # redraws every few seconds fill CI logs; a terminal gets a live bar
            interval = 0.5 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                            mininterval=interval)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label, fmt in _SHOWN:
            if key in logs:
                self.postfix[label] = fmt.format(logs[key])
        if "eval_loss" in logs:
            self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (train, eval, final summary) to output_dir/metrics.jsonl."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename

    def path(self, args) -> Path:
        return Path(args.output_dir) / self.filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class WandbCallback(TrainerCallback):
    """W&B run on the main rank. Honours WANDB_MODE / WANDB_PROJECT / WANDB_DIR;
    the run name comes from `run_name`. Credentials stay with wandb's own login:
    nothing here reads or records WANDB_API_KEY."""

    def __init__(self, mode: Optional[str] = None) -> None:
        self.mode = mode
        self.run = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.run is not None:
            return
        import wandb

        project = os.environ.get("WANDB_PROJECT") or (args.project if args.project != "huggingface" else "scaletrain")
        init_kwargs: dict[str, Any] = {
            "project": project,
            "name": args.run_name,
            "config": args.to_sanitized_dict(),
            "dir": os.environ.get("WANDB_DIR", args.output_dir),
        }
        if self.mode is not None:
            init_kwargs["mode"] = self.mode
        Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**init_kwargs)
        if model is not None and hasattr(model, "num_parameters"):
            self.run.config.update({"model_num_parameters": model.num_parameters()}, allow_val_change=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs:
            return
        numeric = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        numeric["train/global_step"] = state.global_step
        self.run.log(numeric, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.finish()
            self.run = None
