"""Pipeline parallelism in the Trainer (parallelism_config pp_size): this rank's stages of the model, and
torch.distributed.pipelining's schedules over them.

One meaning for micro-batches: a step's gradient-accumulation micro-batches are the pipeline's micro-batches,
and the loss is the non-pipelined run's (each micro-batch's summed loss over the step's global target count,
times the ranks gradients are averaged over), so a pp run trains as one process does. The schedule is built
with scale_grads=False for that reason.

torch's stages fix their shapes at the first step they run, so a step's micro-batches are padded to one shape
(right padding: ignored labels, masked where the batch has a mask; a causal LM's earlier positions never see
it) and schedules are kept per shape. Every rank pads to the same shape (agreed with one small all-reduce: a
new shape makes every stage run a shape-inference pass whose FSDP collectives its data-parallel peers must
join too), so every rank builds the same schedules in the same order. The attention mask and position ids
reach every stage as schedule kwargs, and only hidden states cross a stage boundary.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..modeling import library_model
from .pipeline import check_pipeline_split, cut_stages

IGNORE_INDEX = -100
SEQUENCE_MULTIPLE = 32  # steps' lengths are rounded up to this, so few shapes (schedules) are built
_CACHED_SHAPES = 4
_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


class Pipeline:
    """This rank's pipeline stages (cut from the model before the strategy shards them) and their schedules."""

    def __init__(self, model: torch.nn.Module, config, layout, agree: Callable[[torch.Tensor], torch.Tensor]
                 ) -> None:
        """`agree`: the element-wise maximum of a small tensor over every rank (a collective)."""
        self.layout, self.config, self._agree = layout, config, agree
        self.num_stages = config.pp_stages
        self.stage_ids = [layout.pp_rank + k * layout.pp for k in range(config.pp_stages_per_rank)]
        # the whole model, before this rank prunes it: its checkpoint fingerprint, its HF weight files (names in
        # order, shapes and dtypes) and its FLOPs
        self.full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.full_state = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
        self.non_embedding_parameters = model.num_parameters(exclude_embeddings=True) \
            if hasattr(model, "num_parameters") else None
        ranges = check_pipeline_split(model, self.num_stages, config.pp_split_points)
        self.parts = cut_stages(model, ranges, self.stage_ids)
        lm = library_model(model)
        self._loss_function, self._vocab = lm.loss_function, lm.config.vocab_size
        self._schedules: OrderedDict = OrderedDict()
        self._owners: Optional[dict[str, int]] = None

    def owners(self, model: torch.nn.Module, gather: Callable[[Any], list]) -> dict[str, int]:
        """The first pp rank holding each of the whole model's tensors (asked of every rank once: a collective)."""
        if self._owners is None:
            names = set(model.state_dict()) if self.layout.rank_in_part == 0 else set()
            self._owners = {}
            for rank, held in enumerate(gather(names)):
                for name in held:
                    self._owners.setdefault(name, rank // self.layout.ranks_per_part)
        return self._owners

    @property
    def holds_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def holds_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    # ------------------------------------------------------------- training
    def train_step(self, micro_batches: list[dict[str, Any]], global_items: Optional[torch.Tensor],
                   device: torch.device) -> torch.Tensor:
        """Forward and backward of the step's micro-batches through the schedule; the step's loss (as the
        non-pipelined step sums it), on every pp rank."""
        if any(b.get("labels") is None for b in micro_batches):
            raise ValueError("pipeline parallelism trains on the LM loss of the last stage: every batch needs labels")
        batch = self._stacked(micro_batches)
        count = len(micro_batches)
        loss_kwargs = {"num_items_in_batch": global_items, "micro_batches": count}
        schedule = self._schedule(count, batch, training=True)
        losses: Optional[list] = [] if self.holds_last else None
        for part in self.parts:
            part.train()
        schedule.step(*self._args(batch), target=batch["labels"] if self.holds_last else None, losses=losses,
                      loss_kwargs=loss_kwargs, return_outputs=False, **self._kwargs(batch))
        return self._from_last_stage(torch.stack(losses).sum().detach() if losses else None, device)

    def _train_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor],
                    micro_batches: int) -> torch.Tensor:
        """A micro-batch's share of the step's loss, as Trainer.compute_loss scales it: summed over its targets
        and divided by the step's, times the ranks gradients are averaged over; without countable targets, its
        mean over the micro-batch count (HF's averaging)."""
        if num_items_in_batch is None:
            return self._mean_loss(logits, labels) / micro_batches
        loss = self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab,
                                   num_items_in_batch=num_items_in_batch.clamp_min(1.0))
        return loss * self.layout.batch_ranks

    def _mean_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab)

    # ----------------------------------------------------------- evaluation
    def predict(self, batch: dict[str, Any], with_logits: bool, device: torch.device
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(mean loss or None without labels, logits or None) of one evaluation batch, on every pp rank: a
        forward-only schedule, then a broadcast from the last stage."""
        rows, length = batch["input_ids"].shape
        batch = self._stacked([batch])
        labels = batch.get("labels")
        schedule = self._schedule(1, batch, training=False)
        losses: Optional[list] = [] if self.holds_last and labels is not None else None
        for part in self.parts:
            part.eval()
        logits = schedule.eval(*self._args(batch), target=labels if losses is not None else None, losses=losses,
                               **self._kwargs(batch))
        loss = None
        if labels is not None:
            loss = self._from_last_stage(losses[0].detach().float() if losses else None, device)
        if not with_logits:
            return loss, None
        shape = (*batch["input_ids"].shape, self._vocab)
        # sent in fp32 whatever the stage computed in (the receivers must know the size)
        logits = self._broadcast_from_last(logits.detach().float() if self.holds_last else None, shape, device)
        return loss, logits[:rows, :length]

    # -------------------------------------------------------------- helpers
    def _stacked(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The micro-batches padded to the shape every rank agrees on, as one batch."""
        ids = [b["input_ids"] for b in micro_batches if isinstance(b.get("input_ids"), torch.Tensor)]
        if len(ids) != len(micro_batches):
            raise ValueError("pipeline parallelism needs input_ids in every batch (the first stage embeds them)")
        local = torch.tensor([max(t.shape[0] for t in ids), max(t.shape[1] for t in ids)], device=ids[0].device)
        rows, length = (int(n) for n in self._agree(local).tolist())
        return stacked(micro_batches, rows, -(-length // SEQUENCE_MULTIPLE) * SEQUENCE_MULTIPLE)

    def _args(self, batch: dict[str, Any]) -> tuple:
        return (batch["input_ids"],) if self.holds_first else ()

    @staticmethod
    def _kwargs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}

    def _schedule(self, count: int, batch: dict[str, Any], training: bool):
        """The schedule for `count` micro-batches of this padded batch's shape (built once per shape)."""
        from torch.distributed.pipelining import PipelineStage

        labelled = batch.get("labels") is not None
        key = (count, tuple(batch["input_ids"].shape), training, labelled, *sorted(self._kwargs(batch)))
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        group = self.layout.pp_mesh(batch["input_ids"].device.type).get_group()
        device = batch["input_ids"].device
        stages = [PipelineStage(part, stage, self.num_stages, device, group=group)
                  for part, stage in zip(self.parts, self.stage_ids, strict=True)]
        schedule_class = runnable_schedule(self.config, count, training)
        # a forward-only pass without labels computes no loss (torch would index the absent targets)
        loss = self._train_loss if training else self._mean_loss if labelled else None
        from torch.distributed.pipelining.schedules import PipelineScheduleMulti

        multi = issubclass(schedule_class, PipelineScheduleMulti)
        schedule = schedule_class(stages if multi else stages[0], count, loss_fn=loss, scale_grads=False)
        self._schedules[key] = schedule
        if len(self._schedules) > _CACHED_SHAPES:
            self._schedules.popitem(last=False)
        return schedule

    def _from_last_stage(self, value: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """A scalar the last stage computed, on every rank of this pipeline (a sum over pp: the others add 0)."""
        total = (value if value is not None else torch.zeros((), device=device)).to(device, torch.float32).clone()
        dist.all_reduce(total.reshape(1), group=self.layout.pp_mesh(device.type).get_group())
        return total

    def _broadcast_from_last(self, value: Optional[torch.Tensor], shape: tuple, device: torch.device) -> torch.Tensor:
        group = self.layout.pp_mesh(device.type).get_group()
        last_rank = self.layout.pp_mesh(device.type).mesh[-1].item()  # the global rank of the last pp rank
        # the last stage is on pp rank (stages - 1) % pp: the last pp rank for loop-ordered stages
        buffer = value.contiguous() if value is not None else torch.empty(shape, device=device)
        dist.broadcast(buffer, src=last_rank, group=group)
        return buffer


def runnable_schedule(config, count: int, training: bool) -> type:
    """torch's schedule class for the config's pp_schedule that runs `count` micro-batches: a step the schedule
    cannot run (an epoch's last, with fewer micro-batches) runs as GPipe, or LoopedBFS with several stages per
    rank, as do forward-only passes. Each computes the same gradients."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    if training and config.schedule_fits(count):
        return get_schedule_class(config.pp_schedule)
    return get_schedule_class("LoopedBFS" if config.pp_stages_per_rank > 1 else "GPipe")


def stacked(micro_batches: list[dict[str, Any]], rows: int, length: int) -> dict[str, torch.Tensor]:
    """The micro-batches as one batch of equal-shaped micro-batches (concatenated along rows, each padded to
    rows x length): extra positions and rows are ignored labels (and masked positions where there is a mask);
    the schedule splits it back along rows."""
    present = [{key for key, value in batch.items() if value is not None} for batch in micro_batches]
    unknown = sorted(set().union(*present) - set(_INPUTS))
    if unknown:
        raise ValueError(f"pipeline parallelism passes only {', '.join(_INPUTS)} through its stages; the batch "
                         f"also has {unknown}: drop those columns (remove_unused_columns) or train without pp_size")
    if any(keys != present[0] for keys in present):
        raise ValueError(f"pipeline parallelism needs the same columns in every micro-batch of a step; got "
                         f"{[sorted(keys) for keys in present]}")
    keys = [k for k in _INPUTS if k in present[0]]
    return {key: torch.cat([_padded(b[key], key, rows, length) for b in micro_batches]) for key in keys}


def _padded(tensor: torch.Tensor, key: str, rows: int, length: int) -> torch.Tensor:
    """`tensor` (rows x seq) padded to rows x length: extra rows attend normally (a fully masked row would give
    NaN activations) and learn nothing; position ids count on."""
    have_rows, have = tensor.shape
    if key == "position_ids":
        steps = torch.arange(1, length - have + 1, device=tensor.device)
        tensor = torch.cat([tensor, tensor[:, -1:] + steps], dim=1) if length > have else tensor
        extra = torch.arange(length, device=tensor.device).expand(rows - have_rows, length)
        return torch.cat([tensor, extra.to(tensor.dtype)])
    fill = {"labels": IGNORE_INDEX, "attention_mask": 0, "input_ids": 0}[key]
    out = torch.full((rows, length), fill, dtype=tensor.dtype, device=tensor.device)
    out[:have_rows, :have] = tensor
    if key == "attention_mask":
        out[have_rows:] = 1
    return out


def pipeline_roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a data-parallel wrapper makes roots of: each pipeline stage this rank runs, or the model."""
    pipeline: Optional[Pipeline] = getattr(model, "scaletrain_pipeline", None)
    return pipeline.parts if pipeline is not None else [model]


def attach(model: torch.nn.Module, pipeline: Pipeline) -> None:
    """Record the pipeline on the (pruned) model, where the strategy and checkpoints find it."""
    model.__dict__["scaletrain_pipeline"] = pipeline  # a plain attribute: not a submodule


def pipeline_of(model: torch.nn.Module) -> Optional[Pipeline]:
    return getattr(model, "scaletrain_pipeline", None)

