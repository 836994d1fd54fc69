"""The model a task trains: the task's Auto head on model.name_or_path, or for seq2seq with
model.encoder_decoder a BERT2BERT EncoderDecoderModel warm-started from it (HF's warm-starting recipe)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..parallel.console import transformers_quiet
from .base import model_config

logger = logging.getLogger(__name__)

HEADS = {"text-classification": "AutoModelForSequenceClassification",
         "token-classification": "AutoModelForTokenClassification",
         "causal-lm": "AutoModelForCausalLM",
         "seq2seq": "AutoModelForSeq2SeqLM"}


def model_builders(cfg, path: str, tokenizer: Any = None, **config_kwargs) -> tuple[Callable, Callable]:
    """(load pretrained weights, build from the config): the strategy decides which one runs where.
    With model.config_overrides the architecture differs from the checkpoint's, so both build from
    the config (a random init)."""
    import transformers

    if cfg.task == "seq2seq" and cfg.model.encoder_decoder:
        return _encoder_decoder(cfg, path, tokenizer)
    head = getattr(transformers, HEADS[cfg.task])
    config = model_config(cfg, path, **config_kwargs)

    def from_config():
        return head.from_config(config)

    def from_pretrained():
        if cfg.model.config_overrides:
            return from_config()
        with transformers_quiet():  # its load report, once per rank, is replaced by report_loading's lines
            model, info = head.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True,
                                               output_loading_info=True)
        report_loading(model, info, path)
        return model

    return from_pretrained, from_config


def report_loading(model: Any, info: dict[str, list], path: str) -> None:
    """What loading the checkpoint into the task's model left out, said once and in proportion: the task
    head a fine-tune adds is expected (info, main process); weights of the model's body missing from the
    checkpoint or of another shape are a warning, since they start from random values."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    missing = list(info.get("missing_keys") or [])
    head = sorted({key.rsplit(".", 1)[0] for key in missing if not key.startswith(prefix)})
    body = [key for key in missing if key.startswith(prefix)]
    mismatched = [str(entry[0] if isinstance(entry, (list, tuple)) else entry)
                  for entry in info.get("mismatched_keys") or []]
    if head:
        logger.info("%s: new task head %s, initialised at random (not in the checkpoint)", type(model).__name__,
                    ", ".join(head))
    if body or mismatched:
        logger.warning("%s from %s: %d weights missing from the checkpoint and %d of another shape start from "
                       "random values: %s", type(model).__name__, path, len(body), len(mismatched),
                       ", ".join((body + mismatched)[:8]))
    unused = info.get("unexpected_keys") or []
    if unused:
        logger.info("%d weights of %s are not used by %s (e.g. %s)", len(unused), path, type(model).__name__,
                    ", ".join(sorted(unused)[:3]))


def _encoder_decoder(cfg, path: str, tokenizer: Any) -> tuple[Callable, Callable]:
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    encoder = model_config(cfg, path)
    decoder = model_config(cfg, path)
    decoder.is_decoder, decoder.add_cross_attention = True, True
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)

    def from_config():
        return _with_special_tokens(EncoderDecoderModel._from_config(config), tokenizer)  # zero3-aware init

    def from_pretrained():
        if cfg.model.config_overrides:
            return from_config()
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(
            path, path, encoder_config=encoder, decoder_config=decoder, local_files_only=True)
        return _with_special_tokens(model, tokenizer)

    return from_pretrained, from_config


def _with_special_tokens(model, tokenizer):
    """A BERT decoder starts from [CLS] and stops at [SEP] (HF's bert2bert settings); generation reads
    these from the generation config, the loss's label shifting from the model config."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for holder in (model.config, model.generation_config):
        holder.decoder_start_token_id, holder.pad_token_id, holder.eos_token_id = start, tokenizer.pad_token_id, end
    model.config.vocab_size = model.config.decoder.vocab_size
    return model


def build_on_meta(cfg, path: str) -> torch.nn.Module:
    """The architecture without weights or memory (for estimates)."""
    _, from_config = model_builders(cfg, path, tokenizer=_NoTokens(), **_label_sizes(cfg))
    with torch.device("meta"):
        return from_config()


class _NoTokens:
    cls_token_id = bos_token_id = sep_token_id = eos_token_id = pad_token_id = 0


def _label_sizes(cfg) -> dict:
    return {"num_labels": 2} if cfg.task in ("text-classification", "token-classification") else {}
