"""Pipeline parallelism (parallelism_config pp_size), first part: an HF decoder-only causal LM cut into stages
that torch.distributed.pipelining's schedules run (GPipe, 1F1B, Interleaved1F1B).

A stage is the model itself, pruned: the first keeps the token embedding, each keeps its run of decoder
layers (under their original indices, so parameter names and checkpoints do not change), the last keeps the
final norm and the LM head, and every stage keeps the rotary embedding (each recomputes its cos/sin from the
position ids). Its forward takes token ids (first stage) or hidden states and returns one tensor: hidden states,
or the last stage's logits. The attention mask and position ids reach every stage as schedule kwargs (all pp
ranks of a data-parallel rank read the same batch), so only hidden states cross the stage boundary. The
tracing front end (`pipeline()`) is not used: it fails on gloo ("input tensor has to be contiguous").

Not wired into the Trainer yet (see the pipeline issue).
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from ..modeling import library_model


def balanced_splits(weights: list[int], stages: int) -> list[int]:
    """The first unit of each stage, for `stages` contiguous runs of `weights` whose largest sum is smallest
    (the classic linear partition, by dynamic programming)."""
    if stages < 1 or stages > len(weights):
        raise ValueError(f"{len(weights)} units cannot form {stages} pipeline stages")
    prefix = [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)
    count = len(weights)
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for end in range(s, count + 1):
            for start in range(s - 1, end):
                cost = max(best[s - 1][start], prefix[end] - prefix[start])
                if cost < best[s][end]:
                    best[s][end], cut[s][end] = cost, start
    starts, end = [], count
    for s in range(stages, 0, -1):
        end = cut[s][end]
        starts.append(end)
    return starts[::-1]


def stage_units(model: torch.nn.Module) -> list[int]:
    """Parameter counts of the units a pipeline splits: the embedding, each decoder layer, norm + head."""
    lm = library_model(model)
    inner = lm.model
    head = sum(p.numel() for p in inner.norm.parameters()) + sum(p.numel() for p in lm.lm_head.parameters())
    return ([sum(p.numel() for p in inner.embed_tokens.parameters())]
            + [sum(p.numel() for p in layer.parameters()) for layer in inner.layers] + [head])


def layer_ranges(model: torch.nn.Module, stages: int, split_points: Optional[list[int]] = None
                 ) -> list[range]:
    """The decoder layers of each stage: at the user's split points (the first layer of stages 2, 3, ...), or
    balanced by parameter count with the embedding counted on the first stage and norm + head on the last."""
    layers = len(library_model(model).model.layers)
    if split_points is not None:
        starts = [0, *split_points]
        if sorted(set(starts)) != starts or starts[-1] >= layers or len(starts) != stages:
            raise ValueError(f"pp split points {split_points} must be {stages - 1} increasing layer indices "
                             f"below {layers}")
    else:
        units = stage_units(model)
        starts = [max(0, s - 1) for s in balanced_splits(units, stages)]
        starts[0] = 0
    ends = [*starts[1:], layers]
    if any(end <= start for start, end in zip(starts, ends, strict=True)):
        raise ValueError(f"{layers} decoder layers cannot give each of {stages} pipeline stages one")
    return [range(start, end) for start, end in zip(starts, ends, strict=True)]


def prune_to_stage(model: torch.nn.Module, layers: range, first: bool, last: bool) -> torch.nn.Module:
    """`model` (an HF causal LM) keeps what its stage runs, in place, and runs as that stage."""
    lm = library_model(model)
    if lm.config.tie_word_embeddings and not (first and last):
        raise ValueError("pipeline stages with tied input and output embeddings: the embedding is on the first "
                         "stage and the head on the last; untie them (tie_word_embeddings=False)")
    inner = lm.model
    inner.layers = torch.nn.ModuleDict({str(i): inner.layers[i] for i in layers})
    if not first:
        inner.embed_tokens = None
    if not last:
        inner.norm, lm.lm_head = None, None
    lm.forward = types.MethodType(_stage_forward, lm)
    return model


def _stage_forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask

    inner = self.model
    hidden = inner.embed_tokens(inputs) if inner.embed_tokens is not None else inputs
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                              position_ids=position_ids)
    rotary = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in inner.layers.values():
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
    if inner.norm is None:
        return hidden
    return self.lm_head(inner.norm(hidden))
