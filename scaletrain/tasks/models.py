"""The model a task trains: the task's Auto head on model.name_or_path, or for seq2seq with
model.encoder_decoder a BERT2BERT EncoderDecoderModel warm-started from it (HF's warm-starting recipe)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .base import model_config

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
        return head.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True)

    return from_pretrained, from_config


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
