"""Per-rank memory prediction for every strategy and precision, for any world size.

Model states (Ψ = trainable parameters, N = ranks, Adam(W)):

    strategy   parameters           gradients            optimizer state
    single     4Ψ                   4Ψ                   8Ψ  (two fp32 moments)
    ddp        4Ψ                   4Ψ                   8Ψ  (gradients are views into DDP's buckets)
    fsdp       4Ψ/N                 4Ψ/N                 8Ψ/N
    zero1      dΨ                   dΨ/N (+ dΨ if k>1)   8Ψ/N + 4Ψ/N fp32 master partition
    zero2      dΨ                   dΨ/N                 8Ψ/N + 4Ψ/N
    zero3      dΨ/N                 dΨ/N                 8Ψ/N + 4Ψ/N

d is the parameter width DeepSpeed trains in (4 fp32, 2 bf16/fp16); single,
DDP and FSDP keep fp32 parameters under mixed precision (autocast / FSDP2's
MixedPrecisionPolicy cast on the fly). DeepSpeed keeps an fp32 master
partition beside its parameters even in fp32 (measured), reduces gradients
bucket by bucket into the rank's partition at the step's last micro-batch,
and (stage 1 only) accumulates full gradients over the k-1 micro-batches
before it when k > 1. These are the ZeRO
paper's formulas (Rajbhandari et al., 2020) with DeepSpeed's actual layout;
ZeRO's 16Ψ total for mixed precision is 2Ψ + 2Ψ + 12Ψ here.

Buffers: DDP's gradient buckets (4Ψ beside the gradients only with
ddp_gradient_as_bucket_view=False; by default the gradients are views into
them), DeepSpeed's reduction bucket (reduce_bucket_size elements) and FSDP's
unsharded block (the largest block, gathered in the compute dtype, twice with
prefetch).

Activations per micro-batch of b sequences of length s (hidden size h, a
heads of which k key/value heads, MLP width I, L layers, vocabulary V), in
values of the activation width (4 bytes fp32, 2 under bf16/fp16): each layer
keeps per token about 7h values every tensor-parallel rank holds (the two
norms' inputs and outputs, the residual stream) plus (2h + 2h·k/a + m·I)/tp
values that tensor parallelism splits (queries, keys, values and attention
output; the MLP's m = 4 intermediate tensors when gated as in Llama, 2 as
in GPT-2, plus what an activation written in Python keeps: ~3 for GPT-2's
gelu_new), plus a·s/tp attention scores under eager attention (SDPA and
flash kernels keep none; eager keeps its fp32 softmax and, in bf16/fp16, a
copy). Under autocast (single and DDP in bf16/fp16 keep fp32 parameters) the
7h residual and norm values stay fp32. This is the Korthikanti et al. (2022) accounting
for HF's decoder layers, checked against tensor-byte measurements on CPU
(Llama: benchmarks/parallelism.py, tests/test_plan.py; GPT-2:
benchmarks/memory.py). A checkpointed layer keeps only its input (h values
per token; with selective checkpointing also the outputs of every other matmul
and of the attention: h + (3h + h·k/a + I)/tp). The logits add s·b·V fp32
values three times (logits, their
log-softmax, its gradient) at the start of backward; a checkpointed block's
recompute comes later, so the larger of the two counts. The LM head is whole
on every tensor-parallel rank, so the logits do not shrink with tp; under
the chunked loss (chunked_loss, on by default where the logits would
dominate) only one chunk's logits live at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .memory import format_bytes
from ..modeling import block_classes, chunked_loss_obstacle

STRATEGY_NAMES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
DEEPSPEED_DEFAULT_REDUCE_BUCKET = 500_000_000


@dataclass
class ModelShape:
    parameters: int  # trainable elements
    largest_block: int  # elements of the largest transformer block (FSDP's unit)
    hidden: int
    heads: int
    layers: int
    vocab: int
    kv_heads: int = 0  # 0: as many as heads
    intermediate: int = 0  # MLP width; 0: 4 x hidden
    gated_mlp: bool = False  # gate and up projections (Llama, Qwen2, Mistral, Gemma)
    attention_scores: bool = False  # eager attention keeps the a x s x s scores for backward
    activation_extra: int = 0  # MLP-width tensors a python-written activation (GPT-2's gelu_new) keeps
    loss_chunkable: bool = False  # the chunked causal-LM loss can serve this model (middleware/chunked_loss.py)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        config = getattr(model, "config", None)
        blocks = [m for m in model.modules() if isinstance(m, block_classes(model))]

        def get(*names: str) -> int:
            return next((getattr(config, n) for n in names if getattr(config, n, None)), 0)

        return cls(
            parameters=sum(_numel(p) for p in model.parameters() if p.requires_grad),
            largest_block=max((sum(_numel(p) for p in b.parameters()) for b in blocks), default=0),
            hidden=get("hidden_size", "n_embd", "d_model"),
            heads=get("num_attention_heads", "n_head"),
            layers=get("num_hidden_layers", "n_layer") or len(blocks),
            # only a language-model head produces per-token vocabulary logits
            vocab=get("vocab_size") if _has_lm_head(model) else 0,
            kv_heads=get("num_key_value_heads"),
            intermediate=get("intermediate_size", "n_inner", "d_ff"),
            gated_mlp=any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in model.named_modules()),
            attention_scores=getattr(config, "_attn_implementation", None) == "eager",
            activation_extra=_ACTIVATION_EXTRA.get(getattr(config, "activation_function", None)
                                                   or getattr(config, "hidden_act", None), 0),
            loss_chunkable=_loss_chunkable(model),
        )


# HF's activations written as Python arithmetic (transformers.activations) keep intermediates for backward
# that a fused kernel (F.gelu, F.silu) does not: tanh-approximated GELUs keep about three MLP-width tensors
_ACTIVATION_EXTRA = {"gelu_new": 3, "gelu_fast": 3, "gelu_python": 2, "quick_gelu": 2}


def _loss_chunkable(model: torch.nn.Module) -> bool:
    return chunked_loss_obstacle(model) is None


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # a ZeRO-3 parameter is empty outside its gather


def _has_lm_head(model: torch.nn.Module) -> bool:
    get_head = getattr(model, "get_output_embeddings", None)
    return callable(get_head) and get_head() is not None


@dataclass
class Estimate:
    strategy: str
    world_size: int
    precision: str
    parameters: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    offloaded: float  # bytes kept in host memory instead (DeepSpeed offload)

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations


def estimate(shape: ModelShape, strategy: str, world_size: int, precision: str = "fp32", micro_batch: int = 1,
             seq_len: int = 512, checkpointing: int = 0, offload_optimizer: bool = False,
             offload_params: bool = False, reduce_bucket_size: Optional[int] = None,
             accumulation: int = 1, gradient_as_bucket_view: bool = True,
             loss_chunk: Optional[int] = None, selective: bool = False) -> Estimate:
    """`loss_chunk`: the chunked causal-LM loss's tokens per chunk where it applies (planned_loss_chunk);
    `selective`: the checkpointed blocks use selective checkpointing."""
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGY_NAMES}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: choose fp32, bf16 or fp16")
    psi, n = float(shape.parameters), (1 if strategy == "single" else world_size)
    compute = 4 if precision == "fp32" else 2
    buffers, offloaded = 0.0, 0.0
    if strategy in ("single", "ddp"):
        params, grads, optim = 4 * psi, 4 * psi, 8 * psi
        if strategy == "ddp" and n > 1 and not gradient_as_bucket_view:
            buffers = 4 * psi
    elif strategy == "fsdp":
        params, grads, optim = 4 * psi / n, 4 * psi / n, 8 * psi / n
        buffers = 2 * compute * shape.largest_block + 4 * shape.largest_block
    else:
        width = compute  # DeepSpeed trains the module itself in the low precision
        master, moments = 4 * psi / n, 8 * psi / n
        params = width * psi / n if strategy == "zero3" else width * psi
        grads = width * psi / n + (width * psi if strategy == "zero1" and accumulation > 1 else 0.0)
        optim = master + moments
        bucket = reduce_bucket_size if reduce_bucket_size is not None else min(DEEPSPEED_DEFAULT_REDUCE_BUCKET,
                                                                               shape.hidden ** 2 or psi)
        buffers = 4 * min(bucket, psi)
        if offload_optimizer:
            offloaded += optim
            optim = 0.0
        if offload_params and strategy == "zero3":
            offloaded += params
            params = 0.0
    if strategy == "zero3":
        loss_chunk = None  # the LM head's weight is whole only inside its forward: the full loss stays
    autocast = strategy in ("single", "ddp") and precision != "fp32"  # fsdp and DeepSpeed cast the parameters
    return Estimate(strategy, n, precision, params, grads, optim, buffers,
                    activation_bytes(shape, micro_batch, seq_len, precision, checkpointing, loss_chunk=loss_chunk,
                                     selective=selective, autocast=autocast),
                    offloaded)


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str, checkpointing: int,
                     tp: int = 1, loss_chunk: Optional[int] = None, selective: bool = False,
                     autocast: bool = False, sp: int = 1) -> float:
    """`checkpointing`: 0 = off, k = every k-th block checkpointed (1 = all); `tp`: the tensor-parallel ranks
    a layer is split over; `loss_chunk`: tokens per chunk of the chunked loss, which holds one chunk's logits;
    `autocast`: low precision through autocast over fp32 parameters (single, DDP), where the residual stream and
    the norms stay fp32 (see the module docstring); `sp`: the ranks a row's sequence is split over (Ulysses:
    every layer holds seq_len/sp tokens; attention also keeps the all-to-all's head-sliced queries, keys, values
    and output, the same bytes again, and runs SDPA, which keeps no scores)."""
    s, b, h = seq_len / sp, micro_batch, shape.hidden
    heads = max(shape.heads, 1)
    kv_ratio = (shape.kv_heads or heads) / heads
    width = 4 if precision == "fp32" else 2
    stream = 4 if autocast else width
    mlp_tensors = (4 if shape.gated_mlp else 2) + shape.activation_extra
    split = (2 * h + 2 * h * kv_ratio + mlp_tensors * (shape.intermediate or 4 * h)) * width
    if sp > 1:
        split += (2 * h + 2 * h * kv_ratio) * width
    if shape.attention_scores and sp == 1:  # the fp32 softmax and its low-precision copy when training in bf16/fp16
        split += heads * seq_len * (4 + (width if precision != "fp32" else 0))
    per_layer = s * b * (7 * h * stream + split / tp)
    checkpointed = math.ceil(shape.layers / checkpointing) if checkpointing else 0
    # a checkpointed block keeps its input; selectively, also every other matmul's output (queries, values,
    # the gate projection; the MLP's output, whole before the row-wise all-reduce) and the attention output
    kept_by_checkpointed = h * stream
    if selective:
        kept_by_checkpointed += (h + (2 * h + h * kv_ratio + (shape.intermediate or 4 * h)) / tp) * width
    kept = (shape.layers - checkpointed) * per_layer + checkpointed * s * b * kept_by_checkpointed
    logits = 3 * 4 * min(s * b, loss_chunk or s * b) * shape.vocab
    # the logits peak at the start of backward, a recomputed block later: one or the other is live
    return kept + max(logits, per_layer if checkpointed else 0.0)


def estimate_table(shape: ModelShape, world_sizes: list[int], precision: str, micro_batch: int, seq_len: int,
                   checkpointing: int, offload_optimizer: bool = False, offload_params: bool = False,
                   accumulation: int = 1, gradient_as_bucket_view: bool = True,
                   loss_chunk: Optional[int] = None, selective: bool = False) -> str:
    header = ("| strategy | ranks | precision | parameters | gradients | optimizer state | buffers | activations "
              "| total per rank | offloaded to host |")
    lines = [header, "|" + "---|" * 10]
    for world in world_sizes:
        for name in STRATEGY_NAMES:
            if name == "single" and world > 1:
                continue
            e = estimate(shape, name, world, precision, micro_batch, seq_len, checkpointing,
                         offload_optimizer and name.startswith("zero"), offload_params and name == "zero3",
                         accumulation=accumulation, gradient_as_bucket_view=gradient_as_bucket_view,
                         loss_chunk=loss_chunk, selective=selective)
            lines.append(f"| {name} | {e.world_size} | {precision} | {format_bytes(e.parameters)} | "
                         f"{format_bytes(e.gradients)} | {format_bytes(e.optimizer)} | {format_bytes(e.buffers)} | "
                         f"{format_bytes(e.activations)} | {format_bytes(e.total)} | {format_bytes(e.offloaded)} |")
    return "\n".join(lines)


def precision_of(args) -> str:
    """TrainingArguments' training precision as the estimates name it."""
    return "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")


def world_sizes_for(requested: Optional[int]) -> list[int]:
    if requested is not None:
        return [requested]
    return [1, 2, 8, 64]
