"""Ulysses sequence parallelism (parallelism_config sp_size): each of a row's sp ranks trains on one contiguous
slice of its sequence, and attention, the one layer that mixes positions, sees the whole sequence.

Around attention, an autograd all-to-all trades sequence slices for head slices: (B, H, T/sp, D) on every rank
becomes (B, H/sp, T, D), attention runs over the whole sequence for H/sp heads, and the reverse all-to-all
restores the sequence slices (DeepSpeed-Ulysses). Every other layer works on T/sp tokens, so activations, the
logits and the loss shrink by sp. The attention function is registered with transformers' AttentionInterface,
so every HF model that calls attention through it (PreTrainedModel._supports_attention_backend) works.

What the slices cannot see is decided here, from the whole micro-batch, before it is split: labels are shifted
over the whole row (the last token of a slice predicts the first of the next) and passed as `shift_labels`;
position ids are the whole row's (RoPE angles, and packed rows' document starts); the attention mask (causal,
padding, one block per packed document, a sliding window) is built over the whole row, since HF's own mask code
would only see a slice. Outside a split forward (evaluation, generation) the function is SDPA with HF's mask.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from math import gcd
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from ..modeling import label_shift, library_model

logger = logging.getLogger(__name__)
ATTENTION = "scaletrain_ulysses"  # the attention implementation name a sequence-parallel model runs with
IGNORE_INDEX = -100


@dataclass
class SplitRows:
    """The whole micro-batch's view that attention needs while the ranks hold slices of it."""
    group: Any  # the sp process group
    size: int
    position_ids: torch.Tensor  # (B, T) of the whole rows
    valid: Optional[torch.Tensor]  # (B, T) bool: False for padding; None when every token is real
    packed: bool  # position ids restart inside a row: one attention block per document
    _masks: dict = field(default_factory=dict)  # (device, window) -> the (B, 1, T, T) bool mask, or None

    def mask(self, device: torch.device, window: Optional[int]) -> Optional[torch.Tensor]:
        """Which keys each query attends to over the whole rows, built once per micro-batch and reused by
        every layer; None where the plain causal mask is exact (SDPA then uses its causal kernel)."""
        key = (device, window)
        if key not in self._masks:
            self._masks[key] = self._build(device, window)
        return self._masks[key]

    def _build(self, device: torch.device, window: Optional[int]) -> Optional[torch.Tensor]:
        if self.valid is None and not self.packed and not window:
            return None
        positions = self.position_ids.to(device)
        length = positions.shape[1]
        query = torch.arange(length, device=device)[:, None]
        key = torch.arange(length, device=device)[None, :]
        allowed = (key <= query)[None]
        if window:
            allowed = allowed & (query - key < window)[None]
        if self.packed:  # a document starts where its position id is 0
            document = torch.cumsum(positions == 0, dim=1)
            allowed = allowed & (document[:, :, None] == document[:, None, :])
        if self.valid is not None:
            allowed = allowed & self.valid.to(device)[:, None, :]
        # a query with no key left (a leading pad) attends to itself: finite outputs that no target reads
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)[None]
        return allowed[:, None]


class _Active:
    """The split micro-batch running forward and backward, or None. A process-wide value, not a ContextVar:
    on CUDA the autograd engine runs the backward (and activation checkpointing's recomputation) on its own
    device threads, which do not see the training thread's context variables."""
    rows: Optional[SplitRows] = None


@contextlib.contextmanager
def split_rows(rows: Optional[SplitRows]) -> Iterator[None]:
    """Attention runs sequence-parallel inside (with `rows` None: a no-op); activation checkpointing's
    recomputation runs inside too, since the backward does."""
    previous, _Active.rows = _Active.rows, rows
    try:
        yield
    finally:
        _Active.rows = previous
        if rows is not None:  # its masks (B x T x T) are not kept while the step's other micro-batches run
            rows._masks.clear()


def _swap(tensor: torch.Tensor, group, size: int, to_heads: bool) -> torch.Tensor:
    """(B, H, T/sp, D) -> (B, H/sp, T, D) with `to_heads`, else back; an autograd all-to-all over `group`."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    batch, heads, length, dim = tensor.shape
    if to_heads:  # send head block j to rank j; receive sequence slice j from rank j
        send = tensor.reshape(batch, size, heads // size, length, dim).transpose(0, 1).contiguous()
        received = all_to_all_single_autograd(send, None, None, group)
        return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // size, size * length, dim)
    send = tensor.reshape(batch, heads, size, length // size, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = all_to_all_single_autograd(send, None, None, group)
    return received.transpose(0, 1).reshape(batch, size * heads, length // size, dim)


def _kv_heads_for(key: torch.Tensor, query_heads: int, size: int) -> torch.Tensor:
    """Key/value heads repeated just enough to split evenly over `size` ranks (GQA models with fewer kv
    heads than sp ranks), keeping each query head's kv head."""
    heads = key.shape[1]
    repeat = size // gcd(heads, size)
    if repeat == 1:
        return key
    if query_heads % (heads * repeat):
        raise ValueError(f"{query_heads} query heads and {heads} key/value heads per rank cannot split over "
                         f"sp_size={size}")
    return key.repeat_interleave(repeat, dim=1)


@torch.compiler.disable  # under torch_compile attention runs eagerly: the split rows change every micro-batch
def ulysses_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (B, heads, T, D) in, (B, T, heads, D) out."""
    rows = _Active.rows
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    unsupported = [name for name in ("softcap", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"sp_size: the Ulysses attention (SDPA) does not apply the model's {unsupported[0]}")
    heads = query.shape[1]
    key, value = (_kv_heads_for(t, heads, rows.size) for t in (key, value))
    query, key, value = (_swap(t, rows.group, rows.size, to_heads=True) for t in (query, key, value))
    mask = rows.mask(query.device, sliding_window)
    if mask is not None and key.shape[1] != query.shape[1]:
        # SDPA with both a mask and enable_gqa falls back to its math kernel on CUDA (whole fp32 scores)
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None, enable_gqa=key.shape[1] != query.shape[1])
    return _swap(out, rows.group, rows.size, to_heads=False).transpose(1, 2).contiguous(), None


def ulysses_mask(*args, **kwargs) -> Optional[torch.Tensor]:
    """HF's SDPA mask for the unsplit forwards; none inside a split one (ulysses_attention builds its own over
    the whole rows, and a mask over one slice would cost (T/sp)^2 for nothing)."""
    from transformers.masking_utils import sdpa_mask

    return None if _Active.rows is not None else sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, ulysses_attention)
    AttentionMaskInterface.register(ATTENTION, ulysses_mask)


_register()


def sequence_split_obstacle(model: torch.nn.Module, sp: int = 1, tp: int = 1) -> Optional[str]:
    """Why `model` cannot train with its rows split over `sp` ranks (each holding 1/tp of the heads), or None."""
    model = library_model(model)
    name = type(model).__name__
    if not label_shift(model):
        return f"{name} is not a decoder-only causal LM (Ulysses splits the rows of causal language modelling)"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{name} does not call attention through transformers' AttentionInterface"
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                         for p in inspect.signature(model.forward).parameters.values())
    if not accepts_kwargs:
        return f"{name}.forward takes no loss kwargs (shift_labels, num_items_in_batch)"
    if getattr(model.config, "attention_chunk_size", None):
        return f"{name} attends in chunks (attention_chunk_size), which the Ulysses attention's mask does not build"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in (None, "sdpa", "eager", ATTENTION):
        return (f"{name} runs attn_implementation={implementation!r}; the Ulysses attention wraps SDPA: load the "
                "model with attn_implementation='sdpa'")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads and heads // tp % sp:
        return f"{heads // tp} attention heads per tensor-parallel rank do not split over sp_size={sp}"
    return None


def _refuse_unsplittable(model: torch.nn.Module, sp: int, tp: int) -> None:
    reason = sequence_split_obstacle(model, sp, tp)
    if reason:
        raise ValueError(f"parallelism_config sp_size={sp}: {reason}")


def check_sequence_split(build_from_config, sp: int, tp: int, block_size: Optional[int]) -> None:
    """Before any process group: the model (built from its config on the meta device) can train with its rows
    split over `sp` ranks, and a fixed row length (the CLI's block_size) is a multiple of sp."""
    with torch.device("meta"):
        model = build_from_config()
    _refuse_unsplittable(model, sp, tp)
    if block_size and block_size % sp:
        raise ValueError(f"data.block_size={block_size} is not a multiple of parallelism_config sp_size={sp}: every "
                         f"row would be padded; use {block_size // sp * sp or sp} or {(block_size // sp + 1) * sp}")


def use_ulysses_attention(model: torch.nn.Module, sp: int, tp: int) -> None:
    """Switch `model` to the Ulysses attention, or refuse it naming why."""
    _refuse_unsplittable(model, sp, tp)
    library_model(model).set_attn_implementation(ATTENTION)


class SequenceSplitter:
    """Turns a micro-batch into this rank's slice of it (and the whole rows' view attention needs); with one
    sp rank (size 1) the micro-batch itself, and no view."""

    def __init__(self, group, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        self._padding_logged = False

    def split(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Optional[SplitRows]]:
        if self.size == 1:
            return batch, None
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or "labels" not in batch:
            raise ValueError("sp_size splits rows of input_ids and labels; this batch has "
                             f"{sorted(batch.keys())}")
        batch = self._padded(batch)
        rows, length = batch["input_ids"].shape
        positions = batch.get("position_ids")
        packed = positions is not None and bool((positions[:, 1:] != positions[:, :-1] + 1).any())
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(rows, length)
        mask = batch.get("attention_mask")
        # padding at the end of each row is after every real token: causality already hides it from them (and
        # no target reads a pad's output), so only other padding needs a mask
        trailing = mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all())
        valid = None if trailing else mask.bool()
        labels = batch["labels"]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        whole = {**batch, "position_ids": positions, "labels": shifted, "shift_labels": shifted}
        whole.pop("attention_mask", None)  # attention reads it from SplitRows, over the whole rows
        piece = length // self.size
        local = {key: (value[:, self.rank * piece:(self.rank + 1) * piece].contiguous()
                       if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, length)
                       else value) for key, value in whole.items()}
        # the model's loss is its slice's sum over this count; a slice with no target sums to 0, not 0/0
        local["num_items_in_batch"] = (local["shift_labels"] != IGNORE_INDEX).sum().clamp_min(1)
        return local, SplitRows(self.group, self.size, positions, valid, packed)

    def _padded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Rows padded to a multiple of sp (packed rows have any length): masked, no targets."""
        rows, length = batch["input_ids"].shape
        extra = -length % self.size
        if not extra:
            return batch
        if not self._padding_logged:
            logger.info("sp_size=%d: rows of %d tokens are padded to %d (a length divisible by sp_size avoids it; "
                        "the collators' pad_to_multiple_of does)", self.size, length, length + extra)
            self._padding_logged = True
        out = dict(batch)
        mask = batch.get("attention_mask")
        out["attention_mask"] = F.pad(mask if mask is not None else torch.ones_like(batch["input_ids"]), (0, extra))
        out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        positions = batch.get("position_ids")
        if positions is not None:  # continuing the last document's positions: no new document starts
            tail = positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)
            out["position_ids"] = torch.cat([positions, tail], dim=1)
        for key, value in batch.items():  # the other per-token inputs (input_ids, token_type_ids) padded with 0
            if out[key] is value and isinstance(value, torch.Tensor) and value.shape[:2] == (rows, length):
                out[key] = F.pad(value, (0, 0) * (value.dim() - 2) + (0, extra))
        return out
