"""A causal-LM loss that never holds all the logits (`chunked_loss`, `chunked_loss_tokens`).

A causal LM's training forward computes `[tokens x vocabulary]` logits, upcasts them to fp32 and keeps them,
their log-softmax and their gradient alive: for a 128k vocabulary that is 1.5 MB per token, gigabytes per
micro-batch and often the step's peak. Here the LM head is applied chunk by chunk inside the loss, each
chunk's logits recomputed in backward (activation checkpointing of the chunk), and only positions with a
target are computed at all (a prompt-masked fine-tune skips its prompts). The loss is HF's ForCausalLMLoss
exactly: labels shifted, mean over targets (or sum / num_items_in_batch when given), -100 ignored.

How, without changing the model's parameters or their names: during a training forward with labels, the
model's LM head passes its hidden states through and the model's `loss_function` (HF's own hook) gets them
as "logits" and applies the head itself; the output's `logits` is set to None, so code that reads training
logits fails loudly instead of reading hidden states. Evaluation, generation and forwards without labels
(HF's label smoothing pops them) are untouched. Only models whose forward goes straight from `lm_head` to
`loss_function` qualify (Llama, Qwen2, Mistral, GPT-2, ...): a model that rescales or soft-caps its logits
in between (Gemma 2, Cohere, Granite) keeps the full logits.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import NotSupportedError
from ..modeling import chunked_loss_obstacle, library_model
from ..performance.estimate import ModelShape, activation_bytes
from .base import Middleware

logger = logging.getLogger(__name__)


def check_options(args) -> None:
    value = args.chunked_loss
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        value = args.chunked_loss = {"auto": "auto", "true": True, "false": False}[value.lower()]
    if not (value == "auto" or isinstance(value, bool)):  # 0 and 1 are not choices: they compare equal to bools
        raise ValueError(f"chunked_loss={value!r}: use 'auto' (on where the logits would be a causal LM's "
                         "largest activation), true or false")
    tokens = args.chunked_loss_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"chunked_loss_tokens={tokens!r} must be a positive number of tokens")
    if value is True and args.use_liger_kernel:
        raise NotSupportedError("chunked_loss=True and use_liger_kernel=True both replace the causal-LM loss "
                                "(Liger's fused linear cross-entropy); keep one")


def logits_dominate(shape, checkpointing: bool, precision: str) -> bool:
    """Whether a token's logits (fp32 logits, log-softmax and gradient: 12 bytes per vocabulary entry) outweigh
    what all the layers keep per token (the estimator's count; `shape`: its ModelShape)."""
    layers = activation_bytes(shape, 1, 1, precision, 1 if checkpointing else 0) - 12 * shape.vocab
    return 12 * shape.vocab > layers


def _shape(model: torch.nn.Module) -> ModelShape:
    return ModelShape.of(library_model(model))


def planned_loss_chunk(mode: Union[str, bool], tokens: int, shape, checkpointing: bool,
                       precision: str) -> Optional[int]:
    """Tokens per chunk if the chunked loss will serve a model of this shape, else None (for the estimates)."""
    if mode is False or not shape.loss_chunkable:
        return None
    if mode == "auto" and not logits_dominate(shape, checkpointing, precision):
        return None
    return tokens


class ChunkedLoss(Middleware):
    name = "chunked_loss"

    def __init__(self, mode: Union[str, bool], tokens: int, precision: str, checkpointing: bool,
                 custom_loss: bool) -> None:
        self.mode, self.tokens, self.precision, self.checkpointing = mode, tokens, precision, checkpointing
        self.custom_loss = custom_loss  # a Trainer subclass computes the loss itself: it may read the logits
        self.skipped: Optional[str] = None  # why "auto" left the loss as it was
        self._active = False

    def _reason_to_skip(self, model: torch.nn.Module, strategy) -> Optional[str]:
        reason = chunked_loss_obstacle(model)
        if reason is None and strategy.module_scoped_parameters:
            reason = ("the strategy holds the LM head's weight whole only inside the head's own forward "
                      "(ZeRO-3), and the chunks apply it in the loss")
        if reason is None and strategy.layout.pp > 1:
            reason = "pipeline parallelism computes the loss from the last stage's logits"
        if reason is None and self.custom_loss:
            reason = "compute_loss is overridden, and an override may read the training logits"
        if reason is None and self.mode == "auto" and not logits_dominate(
                _shape(model), self.checkpointing, self.precision):
            reason = "the logits are not the largest activation of this model"
        return reason

    def transform_model(self, model: torch.nn.Module, strategy) -> torch.nn.Module:
        self.skipped = self._reason_to_skip(model, strategy)
        if self.skipped is not None:
            if self.mode is True:
                raise NotSupportedError(f"chunked_loss=True: {self.skipped}; use chunked_loss='auto' or false")
            logger.info("chunked loss off: %s", self.skipped)
            return model
        inner = library_model(model)
        head = inner.get_output_embeddings()
        original = head.forward
        middleware = self

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            return hidden if middleware._active else original(hidden)

        def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                          shift_labels=None, **kwargs):
            if not middleware._active:  # a forward the chunking does not apply to: HF's own loss
                from transformers.loss.loss_utils import ForCausalLMLoss

                return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
            return chunked_causal_lm_loss(logits, labels, head, self.tokens, num_items_in_batch, ignore_index,
                                          shift_labels)

        head.forward = head_forward
        inner.loss_function = loss_function
        inner.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        inner.register_forward_hook(self._after_forward, always_call=True)  # also after a forward that raised
        return model

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = module.training and kwargs.get("labels") is not None

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if self._active:
            self._active = False
            if hasattr(output, "logits"):
                output.logits = None  # they were never computed: the chunks live only inside the loss
        return output

    def describe(self) -> str:
        if self.skipped is None:
            return f"chunked loss ({self.tokens} tokens per chunk)"
        return "" if self.mode == "auto" else f"chunked loss off ({self.skipped})"


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear, chunk: int,
                           num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, ignore_index: int = -100,
                           shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF's ForCausalLMLoss of head(hidden), computed `chunk` target positions at a time."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    kept = targets != ignore_index
    states = hidden.reshape(-1, hidden.size(-1))[kept]  # positions without a target need no logits
    targets = targets[kept]
    total = hidden.float().sum() * 0.0  # in the graph even when no position has a target (HF's NaN mean)
    for start in range(0, targets.numel(), chunk):
        total = total + checkpoint(_summed_cross_entropy, states[start:start + chunk], targets[start:start + chunk],
                                   head.weight, head.bias, use_reentrant=False)
    if num_items_in_batch is None:
        return total / kept.sum()  # HF's mean: NaN without targets, as cross_entropy's
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _summed_cross_entropy(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(F.linear(states, weight, bias).float(), targets, reduction="sum")
