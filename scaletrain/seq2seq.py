"""Seq2SeqTrainer: predictions from `generate()` when predict_with_generate is set."""
from __future__ import annotations

from typing import Any, Optional

import torch
import transformers
from transformers.trainer_pt_utils import nested_detach

from .trainer import IGNORE_INDEX, Trainer


class Seq2SeqTrainer(Trainer):
    # HF's: a GenerationConfig, or the folder/file/model id of one
    load_generation_config = staticmethod(transformers.Seq2SeqTrainer.load_generation_config)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.args.generation_config is not None:  # as HF: it replaces the model's own
            self.model.generation_config = self.load_generation_config(self.args.generation_config)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _generation_kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(overrides)
        length_given = "max_length" in kwargs or "max_new_tokens" in kwargs
        if not length_given and self.args.generation_max_length is not None:
            kwargs["max_length"] = self.args.generation_max_length
        if "num_beams" not in kwargs and self.args.generation_num_beams is not None:
            kwargs["num_beams"] = self.args.generation_num_beams
        return kwargs

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None):
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        gen_kwargs = dict(getattr(self, "_gen_kwargs", {}))
        if self.strategy.eval_needs_all_ranks and self.strategy.world_size > 1:
            # ranks finish generating at different lengths; sharded forwards must stay in step
            gen_kwargs.setdefault("synced_gpus", True)
        gen_inputs = {k: v for k, v in inputs.items() if k not in self.label_names and not k.startswith("decoder_")}
        with torch.no_grad():
            generated = model.generate(**gen_inputs, **gen_kwargs)
            loss = None
            if all(inputs.get(k) is not None for k in self.label_names):
                loss = self.compute_loss(model, inputs).detach().mean()
        labels = inputs.get(self.label_names[0]) if self.label_names else None
        return loss, generated, (nested_detach(labels) if labels is not None else None)


__all__ = ["Seq2SeqTrainer", "IGNORE_INDEX"]
