"""Pipeline parallelism (parallelism_config pp_size), first part: an HF decoder-only causal LM cut into stages
that torch.distributed.pipelining's schedules run (GPipe, 1F1B, Interleaved1F1B).

A stage is the model itself, pruned: the first keeps the token embedding, each keeps its run of decoder
layers (under their original indices, so parameter names and checkpoints do not change), the last keeps the
final norm and the LM head, and every stage keeps the rotary embedding (each recomputes its cos/sin from the
position ids). Its forward takes token ids (first stage) or hidden states and returns one tensor: hidden states,
or the last stage's logits. The attention mask and position ids reach every stage as schedule kwargs (all pp
ranks of a data-parallel rank read the same batch), so only hidden states cross the stage boundary. The
tracing front end (`pipeline()`) is not used: it fails on gloo ("input tensor has to be contiguous").

pipeline_runtime.py runs the stages in the Trainer.
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
    if split_points is None:
        return balanced_layer_ranges(stage_units(model), stages)
    return split_layer_ranges(split_points, stages, len(library_model(model).model.layers))


def split_layer_ranges(split_points: list[int], stages: int, layers: int) -> list[range]:
    """The layers of each stage when stages 2, 3, ... start at the user's split points."""
    starts = [0, *split_points]
    if sorted(set(starts)) != starts or starts[-1] >= layers or len(starts) != stages:
        raise ValueError(f"parallelism_config pp_split_points={split_points} must be {stages - 1} increasing "
                         f"layer indices above 0 and below {layers} (the first layer of stages 2 to {stages})")
    return _ranges(starts, layers)


def balanced_layer_ranges(units: list[int], stages: int) -> list[range]:
    """The decoder layers of each of `stages` stages, balanced by the parameter counts of stage_units' units:
    the embedding counts with the first layer and norm + head with the last, so every stage gets a layer."""
    layers = list(units[1:-1])
    if len(layers) < stages:
        raise ValueError(f"{len(layers)} decoder layers cannot give each of {stages} pipeline stages one; use fewer "
                         "stages (pp_size x pp_stages_per_rank)")
    layers[0] += units[0]
    layers[-1] += units[-1]
    return _ranges(balanced_splits(layers, stages), len(layers))


def _ranges(starts: list[int], layers: int) -> list[range]:
    stages = len(starts)
    ends = [*starts[1:], layers]
    if any(end <= start for start, end in zip(starts, ends, strict=True)):
        raise ValueError(f"{layers} decoder layers cannot give each of {stages} pipeline stages one; use fewer "
                         "stages (pp_size x pp_stages_per_rank)")
    return [range(start, end) for start, end in zip(starts, ends, strict=True)]


def _check_untied(model: torch.nn.Module, whole: bool) -> None:
    if library_model(model).config.tie_word_embeddings and not whole:
        raise ValueError("parallelism_config pp_size with tied input and output embeddings: the embedding is on "
                         "the first stage and the head on the last; untie them (tie_word_embeddings=False)")


def check_pipeline_split(model: torch.nn.Module, stages: int, split_points: Optional[list[int]]) -> list[range]:
    """The decoder layers of each of `stages` pipeline stages `model` (on any device, meta included) is cut
    into, or the error naming why it cannot be."""
    lm = library_model(model)
    inner = getattr(lm, "model", None)
    parts = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
    missing = [name for name in parts if _attribute(lm, name) is None]
    if getattr(lm.config, "is_encoder_decoder", False) or missing or not isinstance(inner.layers, torch.nn.ModuleList):
        raise ValueError(f"parallelism_config pp_size: {type(lm).__name__} is not a decoder-only causal LM laid out "
                         f"as Llama is (embed_tokens, layers, norm, rotary_emb, lm_head; it lacks "
                         f"{missing or ['a layer list']}); train it without pp_size")
    _check_untied(model, stages == 1)
    return layer_ranges(model, stages, split_points)


def check_model_splits_into_stages(build_from_config, config) -> None:
    """Before any process group: the model (built from its config on the meta device) splits into the stages
    a ParallelismConfig asks for."""
    with torch.device("meta"):
        model = build_from_config()
    check_pipeline_split(model, config.pp_stages, config.pp_split_points)


def _attribute(module: torch.nn.Module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module


def _keep(lm: torch.nn.Module, layers: list[int], first: bool, last: bool) -> None:
    inner = lm.model
    held = inner.layers  # a ModuleList, or this rank's ModuleDict (a stage view of it)
    inner.layers = torch.nn.ModuleDict({str(i): held[str(i) if isinstance(held, torch.nn.ModuleDict) else i]
                                        for i in layers})
    if not first:
        inner.embed_tokens = None
    if not last:
        inner.norm, lm.lm_head = None, None


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object over the same children, parameters and buffers: pruning it or registering hooks on it
    (FSDP's root hooks) leaves the original as it was."""
    copy = object.__new__(type(module))
    copy.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in vars(module).items()})
    return copy


def cut_stages(model: torch.nn.Module, ranges: list[range], stage_ids: list[int]) -> list[torch.nn.Module]:
    """`model` pruned in place to what this rank's stages hold (so its state dict is this rank's share, under the
    original names), and one module per stage, each with the stage forward: the transformers model itself for
    one stage per rank, else views over its modules. check_pipeline_split has checked the model and `ranges`."""
    stages = len(ranges)
    holds_first, holds_last = 0 in stage_ids, stages - 1 in stage_ids
    _keep(library_model(model), [i for s in stage_ids for i in ranges[s]], holds_first, holds_last)
    if len(stage_ids) == 1:  # the transformers model, inside a peft wrapper if there is one (its forward takes
        lm = library_model(model)  # HF's keyword arguments, not a stage's)
        lm.forward = types.MethodType(_stage_forward, lm)
        return [lm]
    parts = []
    for stage in stage_ids:
        lm = _shallow_copy(library_model(model))
        lm.model = _shallow_copy(lm.model)
        _keep(lm, list(ranges[stage]), stage == 0, stage == stages - 1)
        lm.forward = types.MethodType(_stage_forward, lm)
        parts.append(lm)
    return parts


def _stage_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token ids (the first stage) or the previous stage's hidden states, through this stage. Named as the model's
    own forward names its inputs, so the columns a dataset keeps (remove_unused_columns) are the pipeline's."""
    from transformers.masking_utils import create_causal_mask

    inner = self.model
    hidden = inner.embed_tokens(input_ids) if inner.embed_tokens is not None else input_ids
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
