"""Seq2SeqTrainer: predictions from `generate()` when predict_with_generate is set."""
from __future__ import annotations

from typing import Any, Optional

import torch
import transformers
from transformers.trainer_pt_utils import nested_detach

from .step import IGNORE_INDEX
from .trainer import Trainer


class Seq2SeqTrainer(Trainer):
    layout_safe_overrides = ("prediction_step",)  # without generation it is the Trainer's (trainer.py)
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

    # HF's: pads to a length with the tokenizer's pad (or eos) token, else the model config's
    _pad_tensors_to_max_len = transformers.Seq2SeqTrainer._pad_tensors_to_max_len

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None, **gen_kwargs):
        """HF's generate step: gen kwargs given here, else evaluate()/predict()'s, else the arguments';
        generated ids (and labels) padded to the generation config's max_length (or max_new_tokens + 1)
        so every batch has the width HF's Seq2SeqTrainer returns; generate runs under the same precision
        context as the loss."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        gen_kwargs = dict(gen_kwargs or getattr(self, "_gen_kwargs", {}))
        if self.strategy.eval_needs_all_ranks and self.strategy.world_size > 1:
            # ranks finish generating at different lengths; sharded forwards must stay in step
            gen_kwargs.setdefault("synced_gpus", True)
        with torch.no_grad(), self.compute_loss_context_manager():
            generated = model.generate(**self._generation_inputs(inputs), **gen_kwargs)
        gen_config = self._filled_generation_config()
        generated = self._pad_like_hf(generated, gen_config)
        loss, labels = None, inputs.get(self.label_names[0]) if self.label_names else None
        if all(inputs.get(k) is not None for k in self.label_names):
            with torch.no_grad():
                loss = self.compute_loss(model, inputs).detach().mean()
        if self.args.prediction_loss_only:
            return loss, None, None
        if labels is not None:
            labels = self._pad_like_hf(labels, gen_config)
        return loss, generated, (nested_detach(labels) if labels is not None else None)

    def _generation_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Labels are not generate()'s input; decoder_* inputs stay (a prompt for the decoder) unless
        they are just the labels shifted, which HF recognises by their equal shape."""
        labels = inputs.get("labels")
        decoder_ids = inputs.get("decoder_input_ids")
        shifted_labels = labels is not None and decoder_ids is not None and labels.shape == decoder_ids.shape
        return {k: v for k, v in inputs.items() if k not in self.label_names and not (
            shifted_labels and k in ("decoder_input_ids", "decoder_attention_mask"))}

    def _filled_generation_config(self):
        """The model's generation config with generate()'s defaults filled in, as HF does after generating."""
        gen_config = self.strategy.unwrap(self.model).generation_config
        if getattr(gen_config, "_from_model_config", False):
            gen_config._from_model_config = False
        if hasattr(gen_config, "_get_default_generation_params"):
            gen_config.update(**gen_config._get_default_generation_params(), defaults_only=True)
        return gen_config

    def _pad_like_hf(self, tensor: torch.Tensor, gen_config) -> torch.Tensor:
        if gen_config.max_length is not None and tensor.shape[-1] < gen_config.max_length:
            return self._pad_tensors_to_max_len(tensor, gen_config.max_length)
        if gen_config.max_new_tokens is not None and tensor.shape[-1] < gen_config.max_new_tokens + 1:
            return self._pad_tensors_to_max_len(tensor, gen_config.max_new_tokens + 1)
        return tensor


__all__ = ["Seq2SeqTrainer", "IGNORE_INDEX"]
