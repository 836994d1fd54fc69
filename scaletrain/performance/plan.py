"""`scaletrain plan`: which layout to train a model with on a given cluster, before renting it.

For a model (built on the meta device: no weights, no memory), a GPU count, GPU memory, sequence length and
global batch, every layout the mesh strategies run is enumerated: dp_replicate x dp_shard x tp (DDP when
dp_shard is 1, FSDP2 or HSDP otherwise; tp ranks inside a node and dividing the attention heads, key/value
heads and MLP width), every micro-batch that divides a data-parallel rank's share of the global batch, with
and without activation checkpointing. Each gets a predicted memory per GPU and step time; the fastest that
fit are shown with the command that runs them.

Memory per GPU (bytes; Adam(W), fp32 parameters as the strategies keep them, Ψ_t = parameters a
tensor-parallel rank holds: the split layers' share plus the embeddings, norms and LM head it keeps whole):

    parameters 4Ψ_t/dp_shard, optimizer 8Ψ_t/dp_shard, gradients 4Ψ_t/dp_shard (4Ψ_t under FSDP with
    accumulation: its no-sync window keeps whole gradients until the last micro-batch), buffers as in
    `scaletrain estimate` (FSDP's gathered block; DDP's gradients are its buckets), activations as in
    `estimate` with the attention and MLP internals divided by tp.

With pipeline stages (pp, outermost; FSDP2 inside each stage; one 1F1B stage per rank when the plan chooses):
Ψ_t is the fullest stage's share (the layers are balanced by parameter count as the Trainer splits them, the
embedding on the first stage, norm and head on the last), and the first stage holds the activations of
min(pp, accumulation) micro-batches of its layers in flight (GPipe and LoopedBFS: every micro-batch; interleaved:
1F1B's times 1 + (pp - 1)/(pp·v)), the last its layers' and the logits' (one micro-batch under 1F1B, every one
under GPipe and LoopedBFS); a stage stays gathered from its first backward to the step's gradient reduction.

This is the model `benchmarks/parallelism.py` measures on 4 CPU ranks (tensor bytes, the CPU analogue of
CUDA's peak allocated memory) and tests/test_plan.py holds within 15% for every layout there.

Step time is a model, not a measurement: compute = training FLOPs (6 per parameter and token, plus attention's
12·L·h·s per token, plus one more forward for checkpointed layers, about half of one when selective, plus the
LM head's FLOPs repeated on every tp rank) / (GPUs x peak x efficiency); communication = ring collectives at
the bandwidth of the links a group spans (a group inside one node uses the intra-node figure, one across nodes
the inter-node one; tp groups must fit a node evenly): FSDP all-gathers the parameters twice per micro-batch
and reduce-scatters gradients once per step, replicas all-reduce gradients once per step, tensor-parallel
layers all-reduce activations four times per layer and micro-batch (six when the layer is recomputed). Data-
parallel collectives are assumed to overlap with compute, tensor-parallel ones not. A pipeline's compute
includes its bubble: it takes (m + pp - 1)/m times as long for m micro-batches ((v·m + pp - 1)/(v·m) interleaved
with v stages per rank), and each micro-batch's activations and their gradients cross every stage boundary
point to point, not overlapped. Every assumption is
printed with the table; a GPU run (`scaletrain bench`) replaces them with measurements.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Union

import torch

from .estimate import ModelShape, activation_bytes
from ..parallel.pipeline import balanced_layer_ranges, check_pipeline_split, split_layer_ranges, stage_units
from .memory import format_bytes
from ..parallel.layout import describe_sizes
from ..parallel.tensor_parallel import tensor_parallel_plan

ADAM_STATE_BYTES = 8  # two fp32 moments per element
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int
    memory: float  # usable bytes per GPU
    peak_tflops: float  # dense, in the training precision
    efficiency: float  # the fraction of peak the matmuls reach
    intra_node_gbps: float  # GB/s per GPU of collective bus bandwidth inside a node
    inter_node_gbps: float  # ... across nodes

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--gpus {self.gpus} --gpus-per-node {self.gpus_per_node}: both must be >= 1")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"--gpus {self.gpus} is not a whole number of nodes of {self.gpus_per_node} GPUs; "
                             "use a multiple of --gpus-per-node")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"--efficiency {self.efficiency}: a fraction of peak, in (0, 1]")

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    def inside_a_node(self, span: int) -> bool:
        """Whether every group of `span` consecutive ranks lies inside one node (a span that does not divide
        the node size would put some groups across two nodes)."""
        return self.gpus <= self.gpus_per_node or (span <= self.gpus_per_node and self.gpus_per_node % span == 0)

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group of `span` consecutive ranks: intra-node only if every such group is in one node."""
        return 1e9 * (self.intra_node_gbps if self.inside_a_node(span) else self.inter_node_gbps)

    def assumptions(self) -> str:
        return (f"{self.gpus} GPUs ({self.nodes} node(s) x {min(self.gpus, self.gpus_per_node)}), "
                f"{format_bytes(self.memory)} each; compute at {self.efficiency:.0%} of {self.peak_tflops:g} "
                f"TFLOP/s; collectives at {self.intra_node_gbps:g} GB/s per GPU inside a node, "
                f"{self.inter_node_gbps:g} GB/s across nodes")


@dataclass(frozen=True)
class PlanShape:
    """What the layouts depend on: the estimator's shape, how much of it tensor parallelism splits, and the
    config's own choices the memory depends on (its TrainingArguments; defaults without one)."""
    model: ModelShape
    tp_split: int  # parameter elements in the layers the model's tensor-parallel plan splits
    tp_sizes: tuple[int, ...]  # tensor-parallel degrees the model can serve (1 always)
    splits_sequence: bool = False  # whether Ulysses sequence parallelism can serve the model (sp_size)
    chunked_loss: Union[str, bool] = "auto"
    chunked_loss_tokens: int = 1024
    checkpoint_every: int = 1  # activation_checkpointing_kwargs every_n_layers, where checkpointing is on
    selective: bool = False  # activation_checkpointing_kwargs selective
    bucket_view: bool = True  # ddp_gradient_as_bucket_view
    pipeline_units: tuple[int, ...] = ()  # stage_units' parameter counts; empty: pipeline stages cannot serve

    @classmethod
    def of(cls, model: torch.nn.Module, candidates: range, args=None) -> "PlanShape":
        from ..parallel.sequence_parallel import sequence_split_obstacle

        shape = ModelShape.of(model)
        options = {**_run_options(args), "splits_sequence": sequence_split_obstacle(model) is None,
                   "pipeline_units": _pipeline_units(model)}
        try:
            styles = tensor_parallel_plan(model, 1)
        except ValueError:  # no plan: data parallelism only
            return cls(shape, 0, (1,), **options)
        modules = dict(model.named_modules())
        split = sum(p.numel() for name in styles for p in modules[name].parameters(recurse=False)
                    if p.requires_grad)
        return cls(shape, split, tuple(tp for tp in candidates if _serves(model, tp)), **options)

    def sp_sizes(self, tp: int, ranks: int, seq_len: int) -> list[int]:
        """The sequence-parallel degrees among `ranks` (the ranks left by tp) that split both the heads a tp rank
        holds and the sequence evenly (1 always)."""
        if not self.splits_sequence:
            return [1]
        heads = max(self.model.heads, 1) // tp
        return [sp for sp in _divisors(ranks) if heads % sp == 0 and seq_len % sp == 0]

    def pp_sizes(self, ranks: int) -> list[int]:
        """The pipeline degrees among `ranks` (those left by tp and sp) that give every stage a layer (1 always)."""
        layers = len(self.pipeline_units) - 2
        return [pp for pp in _divisors(ranks) if pp == 1 or pp <= layers]

    def stage_held(self, layout: "Layout") -> float:
        """Parameter elements a tensor-parallel rank of the layout's fullest pipeline rank holds."""
        if layout.pp == 1:
            return self.held(layout.tp)
        return max(sum(self._stage_held(layout.tp, stage) for stage in stages) for stages in self._rank_stages(layout))

    def stage_layers(self, layout: "Layout") -> tuple[int, int]:
        """Decoder layers on the first pipeline rank and on the last (which also computes the logits)."""
        ranks = self._rank_stages(layout)
        return (sum(len(stage) for _, stage in ranks[0]), sum(len(stage) for _, stage in ranks[-1]))

    def _rank_stages(self, layout: "Layout") -> list[list[tuple[int, range]]]:
        """Each pp rank's (stage index, layers), cut as the Trainer cuts them (balanced, or at the layout's split
        points), stages in loop order as the Trainer assigns them."""
        stages = layout.pp * layout.stages_per_rank
        if layout.split_points:
            ranges = split_layer_ranges(list(layout.split_points), stages, len(self.pipeline_units) - 2)
        else:
            ranges = balanced_layer_ranges(list(self.pipeline_units), stages)
        return [list(enumerate(ranges))[rank::layout.pp] for rank in range(layout.pp)]

    def _stage_held(self, tp: int, stage: tuple[int, range]) -> float:
        index, layers = stage
        units, count = self.pipeline_units, len(self.pipeline_units) - 2
        split_per_layer = self.tp_split / count
        held = sum(units[1 + i] - split_per_layer * (1 - 1 / tp) for i in layers)
        last = count == layers.stop  # the last stage holds the norm and head, the first the embedding
        return held + (units[0] if index == 0 else 0) + (units[-1] if last else 0)

    def loss_chunk(self, checkpointing: bool, precision: str) -> Optional[int]:
        from ..middleware.chunked_loss import planned_loss_chunk

        return planned_loss_chunk(self.chunked_loss, self.chunked_loss_tokens, self.model, checkpointing, precision)

    def held(self, tp: int) -> float:
        """Parameter elements a tensor-parallel rank holds (before any data-parallel sharding)."""
        return self.tp_split / tp + (self.model.parameters - self.tp_split)


def _run_options(args) -> dict:
    if args is None:
        return {}
    from ..middleware.activation_ckpt import every_and_selective

    every, selective = every_and_selective(args)
    return {"chunked_loss": args.chunked_loss, "chunked_loss_tokens": args.chunked_loss_tokens,
            "checkpoint_every": every, "selective": selective, "bucket_view": args.ddp_gradient_as_bucket_view}


def _pipeline_units(model: torch.nn.Module) -> tuple[int, ...]:
    try:
        check_pipeline_split(model, 2, None)
    except ValueError:  # not a decoder laid out as Llama is, tied embeddings, or one layer
        return ()
    return tuple(stage_units(model))


def _serves(model: torch.nn.Module, tp: int) -> bool:
    try:
        tensor_parallel_plan(model, tp)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int
    micro_batch: int
    accumulation: int
    checkpointing: bool
    sp: int = 1
    sharded: Optional[bool] = None  # FSDP; None: when dp_shard > 1 (with sp, FSDP also shards over the sp ranks)
    pp: int = 1  # pipeline ranks (they run under FSDP2)
    schedule: str = "1F1B"
    stages_per_rank: int = 1
    split_points: Optional[tuple[int, ...]] = None  # the first layer of stages 2, 3, ... (None: balanced)

    @property
    def strategy(self) -> str:
        if self.dp_replicate * self.dp_shard * self.tp * self.sp * self.pp == 1:
            return "single"
        sharded = (self.dp_shard > 1 or self.pp > 1) if self.sharded is None else self.sharded
        return "fsdp" if sharded else "ddp"

    @property
    def shard_ranks(self) -> int:
        """The ranks FSDP shards the states over (dp_shard x sp); 1 under DDP."""
        return self.dp_shard * self.sp if self.strategy == "fsdp" else 1

    def describe(self) -> str:
        return describe_sizes(self.dp_replicate, self.dp_shard, self.tp, alone="1 GPU", sp=self.sp, pp=self.pp)

    def parallelism_config(self) -> dict[str, Union[int, str]]:
        sizes: dict[str, Union[int, str]] = {"dp_replicate_size": self.dp_replicate, "dp_shard_size": self.dp_shard,
                                             "tp_size": self.tp}
        if self.sp > 1:
            sizes["sp_size"] = self.sp
        if self.pp > 1:
            sizes.update(pp_size=self.pp, pp_schedule=self.schedule)
        return sizes

    @property
    def in_flight(self) -> float:
        """Micro-batches whose activations the first pipeline rank holds at once, in units of all its layers."""
        m, p, v = self.accumulation, self.pp, self.stages_per_rank
        if self.schedule in ("GPipe", "LoopedBFS"):
            return float(m)
        if self.schedule == "Interleaved1F1B":
            return min(float(m), min(p, m) * (1 + (p - 1) / (p * v)))
        return float(min(p, m))

    @property
    def last_in_flight(self) -> tuple[float, int]:
        """(micro-batches of its layers, micro-batches of logits) the last pipeline rank holds at once: all of
        them when every forward runs before any backward (GPipe, LoopedBFS); one under 1F1B, whose last stage
        runs each backward right after its forward; interleaved, its earlier stages keep the first rank's count."""
        if self.schedule in ("GPipe", "LoopedBFS"):
            return float(self.accumulation), self.accumulation
        return (self.in_flight if self.schedule == "Interleaved1F1B" else 1.0), 1

    @property
    def bubble(self) -> float:
        """The fraction of a step a pipeline rank waits: (pp - 1)/(v·m + pp - 1)."""
        v = self.stages_per_rank if self.schedule == "Interleaved1F1B" else 1
        return (self.pp - 1) / (v * self.accumulation + self.pp - 1)


@dataclass
class Prediction:
    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)  # parameters, gradients, optimizer, buffers, activations
    seconds: dict[str, float] = field(default_factory=dict)  # compute, data_parallel, tensor_parallel
    model_flops: float = 0.0  # per step, without recomputation

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def step_seconds(self) -> float:
        s = self.seconds
        return (max(s["compute"], s["data_parallel"]) + s["tensor_parallel"] + s["sequence_parallel"]
                + s["pipeline"])


def predict_memory(shape: PlanShape, layout: Layout, precision: str, seq_len: int) -> dict[str, float]:
    """Bytes per GPU of `layout`, by kind (see the module docstring)."""
    held = shape.stage_held(layout)
    sharded = held / layout.shard_ranks
    fsdp = layout.strategy == "fsdp"
    compute = 4 if precision == "fp32" else 2
    block = shape.model.largest_block / layout.tp
    # FSDP: the gathered block (twice with prefetch) + its gradient, and the root unit (embeddings, final norm,
    # LM head: what no block holds), which FSDP2 keeps gathered from its forward through backward. DDP's gradients
    # are views into its buckets unless ddp_gradient_as_bucket_view is off; tensor-parallel replicas reduce after
    # backward, off the peak
    root = max(shape.model.parameters - shape.model.layers * shape.model.largest_block, 0)
    buffers = 2 * compute * block + 4 * block + compute * root if fsdp else 0.0
    if layout.pp > 1:  # a stage stays gathered from its first backward to the step's gradient reduction
        buffers = compute * held
    if layout.strategy == "ddp" and layout.tp == 1 and not shape.bucket_view:
        buffers = 4 * held
    return {
        "parameters": 4 * sharded,
        "gradients": 4 * (held if fsdp and layout.accumulation > 1 else sharded),
        "optimizer": ADAM_STATE_BYTES * sharded,
        "buffers": buffers,
        "activations": _activations(shape, layout, precision, seq_len),
    }


def _activations(shape: PlanShape, layout: Layout, precision: str, seq_len: int) -> float:
    """A rank's activations: the whole model's for one micro-batch; with pp, the first rank's layers for the
    micro-batches in flight, or the last rank's layers and the logits for one, whichever is more."""
    def of(model: ModelShape, loss_chunk: Optional[int]) -> float:
        return activation_bytes(model, layout.micro_batch, seq_len, precision,
                                shape.checkpoint_every if layout.checkpointing else 0, layout.tp, loss_chunk,
                                shape.selective, autocast=layout.strategy != "fsdp" and precision != "fp32",
                                sp=layout.sp)

    if layout.pp == 1:
        return of(shape.model, shape.loss_chunk(layout.checkpointing, precision))
    first, last = shape.stage_layers(layout)
    # the chunked loss stays off under pp (the last stage computes the loss from its logits)
    layers_in_flight, logits_in_flight = layout.last_in_flight
    # activation_bytes counts the logits three times (fp32 logits, log-softmax, their gradient): a micro-batch
    # still waiting for its backward holds the first two
    logits = of(replace(shape.model, layers=0), None) * (1 + (logits_in_flight - 1) * 2 / 3)
    return max(of(replace(shape.model, layers=first, vocab=0), None) * layout.in_flight,
               of(replace(shape.model, layers=last, vocab=0), None) * layers_in_flight + logits)


def training_flops(shape: ModelShape, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs of `tokens` (6 per parameter and token, plus attention's 12·L·h·s)."""
    return tokens * (6 * shape.parameters + 12 * shape.layers * shape.hidden * seq_len)


def predict_seconds(shape: PlanShape, layout: Layout, hw: Hardware, precision: str, seq_len: int,
                    global_batch: int) -> tuple[dict[str, float], float]:
    """Step time by part (see the module docstring), and the step's model FLOPs."""
    tokens = global_batch * seq_len
    flops = training_flops(shape.model, tokens, seq_len)
    # one more forward for the checkpointed blocks (a third of forward + backward); selectively, about half
    recompute = (1 / 3) * (0.5 if shape.selective else 1.0) / shape.checkpoint_every if layout.checkpointing else 0.0
    # the LM head is whole on every tp rank: its FLOPs are repeated on tp - 1 more GPUs
    head = 6 * tokens * shape.model.hidden * shape.model.vocab * (layout.tp - 1)
    work = flops * (1 + recompute) + head
    compute = work / (hw.gpus * hw.peak_tflops * 1e12 * hw.efficiency) / (1 - layout.bubble)
    width = 4 if precision == "fp32" else 2
    held = shape.stage_held(layout)
    shards = layout.shard_ranks
    shard_span = layout.tp * shards
    data_parallel = 0.0
    if shards > 1:
        gather = _ring(width * held, shards, hw.bandwidth(shard_span))
        data_parallel += 2 * layout.accumulation * gather + _ring(4 * held, shards, hw.bandwidth(shard_span))
    replicas = layout.dp_replicate * (layout.dp_shard * layout.sp if shards == 1 else 1)  # DDP: every dp x sp rank
    if replicas > 1:
        data_parallel += 2 * _ring(4 * held / shards, replicas, hw.bandwidth(hw.gpus))
    tensor_parallel = 0.0
    if layout.tp > 1:
        per_layer = 6 if layout.checkpointing else 4
        activation = width * layout.micro_batch * seq_len * shape.model.hidden
        tensor_parallel = (layout.accumulation * per_layer * shape.model.layers
                           * 2 * _ring(activation, layout.tp, hw.bandwidth(layout.tp)))
    return {"compute": compute, "data_parallel": data_parallel, "tensor_parallel": tensor_parallel,
            "sequence_parallel": _all_to_all_seconds(shape.model, layout, hw, width, seq_len),
            "pipeline": _point_to_point_seconds(shape.model, layout, hw, width, seq_len)}, flops


def _point_to_point_seconds(shape: ModelShape, layout: Layout, hw: Hardware, width: int, seq_len: int) -> float:
    """Pipeline: each micro-batch's hidden states go to the next stage and their gradients come back, once per
    stage a rank holds; neighbouring pp ranks are hw.gpus / pp ranks apart (pp is the outermost dimension)."""
    if layout.pp == 1:
        return 0.0
    hidden_states = width * layout.micro_batch * seq_len / layout.sp * shape.hidden
    return (2 * layout.accumulation * layout.stages_per_rank * hidden_states
            / hw.bandwidth(2 * hw.gpus // layout.pp))


def _all_to_all_seconds(shape: ModelShape, layout: Layout, hw: Hardware, width: int, seq_len: int) -> float:
    """Ulysses: per layer and micro-batch, queries, keys, values and the output cross the sp ranks once each
    way in forward and again in backward (twice more forward for a recomputed layer); each rank sends
    (sp - 1)/sp of its slice."""
    if layout.sp == 1:
        return 0.0
    kv_ratio = (shape.kv_heads or shape.heads or 1) / max(shape.heads, 1)
    slice_bytes = width * layout.micro_batch * seq_len / layout.sp * shape.hidden * (2 + 2 * kv_ratio) / layout.tp
    passes = 3 if layout.checkpointing else 2
    return (layout.accumulation * shape.layers * passes * slice_bytes * (layout.sp - 1) / layout.sp
            / hw.bandwidth(layout.sp * layout.tp))


def _ring(size: float, ranks: int, bandwidth: float) -> float:
    """Seconds of a ring all-gather or reduce-scatter of `size` bytes (an all-reduce is two)."""
    return size * (ranks - 1) / ranks / bandwidth


def layouts(shape: PlanShape, hw: Hardware, global_batch: int, seq_len: int = 1) -> Iterator[Layout]:
    """Every layout of hw.gpus ranks the strategies run, with every micro-batch and checkpointing choice; with
    sequence parallelism, FSDP shards over dp_shard x sp (sp and tp ranks together inside a node); pipeline
    stages (1F1B, one per rank; not with sp, which they do not run with) outermost."""
    for tp in shape.tp_sizes:
        if hw.gpus % tp or not hw.inside_a_node(tp):  # a layer's all-reduces stay on a node's links
            continue
        for sp in shape.sp_sizes(tp, hw.gpus // tp, seq_len):
            if not hw.inside_a_node(sp * tp):  # the all-to-alls too
                continue
            for pp in shape.pp_sizes(hw.gpus // (tp * sp)) if sp == 1 else [1]:
                yield from _data_parallel_layouts(hw.gpus // (tp * sp * pp), global_batch, tp, sp, pp)


def _data_parallel_layouts(dp: int, global_batch: int, tp: int, sp: int, pp: int) -> Iterator[Layout]:
    """Every dp_shard, micro-batch and checkpointing choice of `dp` data-parallel ranks (1F1B needs at least pp
    micro-batches a step)."""
    if global_batch % dp:
        return
    rows = global_batch // dp
    for dp_shard in _divisors(dp):
        for micro in (m for m in _divisors(rows) if m <= MAX_MICRO_BATCH and rows // m >= pp):
            for checkpointing in (False, True):
                yield Layout(dp // dp_shard, dp_shard, tp, micro, rows // micro, checkpointing, sp,
                             sharded=True if sp > 1 or pp > 1 else None, pp=pp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def predict(shape: PlanShape, layout: Layout, hw: Hardware, precision: str, seq_len: int,
            global_batch: int) -> Prediction:
    seconds, flops = predict_seconds(shape, layout, hw, precision, seq_len, global_batch)
    return Prediction(layout, predict_memory(shape, layout, precision, seq_len), seconds, flops)


def plan(shape: PlanShape, hw: Hardware, precision: str, seq_len: int,
         global_batch: int) -> tuple[list[Prediction], list[Prediction]]:
    """(the meshes with a choice that fits, fastest first; the others, smallest first), each mesh with its
    best micro-batch and checkpointing choice."""
    if global_batch < 1:
        raise ValueError(f"--global-batch {global_batch} must be >= 1")
    predictions = [predict(shape, layout, hw, precision, seq_len, global_batch)
                   for layout in layouts(shape, hw, global_batch, seq_len)]
    if not predictions:
        raise ValueError(f"--global-batch {global_batch} cannot be divided over the data-parallel ranks of any "
                         f"layout of {hw.gpus} GPUs; use a multiple of {hw.gpus}")
    fits = [p for p in predictions if p.total_memory <= hw.memory]
    # ties (compute hides the data-parallel collectives): less communication, which is what an imperfect
    # overlap exposes; then the larger micro-batch (larger matmuls run closer to peak); then less memory
    fits.sort(key=lambda p: (round(p.step_seconds, 9), round(p.seconds["data_parallel"], 9),
                             -p.layout.micro_batch, p.total_memory))
    too_big = sorted((p for p in predictions if p.total_memory > hw.memory), key=lambda p: p.total_memory)
    return _best_per_mesh(fits), _best_per_mesh(too_big)


def _best_per_mesh(predictions: list[Prediction]) -> list[Prediction]:
    """The first of each (pp, dp_replicate, dp_shard, sp, tp): the best micro-batch and checkpointing choice of
    each mesh, so the table shows different layouts rather than one layout's micro-batches."""
    seen, best = set(), []
    for prediction in predictions:
        lay = prediction.layout
        if (lay.pp, lay.dp_replicate, lay.dp_shard, lay.sp, lay.tp) not in seen:
            seen.add((lay.pp, lay.dp_replicate, lay.dp_shard, lay.sp, lay.tp))
            best.append(prediction)
    return best


def command_line(layout: Layout, hw: Hardware, config: str, overrides: tuple[str, ...] = (),
                 checkpointing_kwargs: bool = False) -> str:
    """How to launch `layout` with the repository's torchrun launcher (on every node); `overrides`: the
    config changes the plan was made with; `checkpointing_kwargs`: the config sets
    activation_checkpointing_kwargs (the plan honours them where it checkpoints)."""
    nodes = f"NNODES={hw.nodes} MASTER_ADDR=<first node> " if hw.nodes > 1 else ""
    launch = f"{nodes}NPROC={min(hw.gpus, hw.gpus_per_node)} launch/torchrun.sh {shlex.join([config, *overrides])}"
    options = [f"--per_device_train_batch_size {layout.micro_batch}",
               f"--gradient_accumulation_steps {layout.accumulation}"]
    if layout.strategy != "single":
        sizes = json.dumps(layout.parallelism_config(), separators=(",", ":"))
        options[:0] = [f"--strategy {layout.strategy}", f"--parallelism_config '{sizes}'"]
    # stated either way: the config's own setting must not override the plan's
    options.append(f"--activation_checkpointing {'true' if layout.checkpointing else 'false'}")
    if not layout.checkpointing and checkpointing_kwargs:
        options.append("--activation_checkpointing_kwargs '{}'")  # its kwargs are refused without checkpointing
    return " ".join([launch, *options])


def plan_table(predictions: list[Prediction], hw: Hardware, seq_len: int, global_batch: int) -> list[str]:
    header = ("| # | layout | strategy | micro x accumulation | checkpointing | memory/GPU | states / activations / "
              "buffers | step ms | compute / dp / tp / sp / pp comm ms | tokens/s/GPU | MFU |")
    lines = [header, "|" + "---|" * 11]
    for number, p in enumerate(predictions, 1):
        m, s, lay = p.memory, p.seconds, p.layout
        states = m["parameters"] + m["gradients"] + m["optimizer"]
        mfu = p.model_flops / (p.step_seconds * hw.gpus * hw.peak_tflops * 1e12)
        lines.append(
            f"| {number} | {lay.describe()} | {lay.strategy} | {lay.micro_batch} x {lay.accumulation} | "
            f"{'on' if lay.checkpointing else 'off'} | {format_bytes(p.total_memory)} | "
            f"{format_bytes(states)} / {format_bytes(m['activations'])} / {format_bytes(m['buffers'])} | "
            f"{_ms(p.step_seconds)} | {_ms(s['compute'])} / {_ms(s['data_parallel'])} / {_ms(s['tensor_parallel'])}"
            f" / {_ms(s['sequence_parallel'])} / {_ms(s['pipeline'])} | "
            f"{global_batch * seq_len / p.step_seconds / hw.gpus:,.0f} | {mfu:.0%} |")
    return lines


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def default_peak_tflops(precision: str) -> float:
    """H100 SXM dense peaks: 989 TFLOP/s in bf16/fp16, 495 in fp32 (as TF32 matmuls)."""
    return 495.0 if precision == "fp32" else 989.0


def tp_candidates(gpus_per_node: int) -> range:
    return range(1, gpus_per_node + 1)


def describe_fit(best: Optional[Prediction], hw: Hardware) -> str:
    if best is None:
        return (f"no layout fits in {format_bytes(hw.memory)} per GPU; the smallest are shown: add GPUs, "
                "shorten --seq-len or lower --global-batch")
    return f"{format_bytes(best.total_memory)} of {format_bytes(hw.memory)} used by the fastest"
