"""Memory middleware in one process: mixed precision against fp32, fp16 overflow
handling, activation checkpointing's gradients, the batch-size search, the
memory estimator's formulas, and the misconfigurations refused up front.
The same features on 2 ranks under every strategy: test_memory_distributed.py."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from helpers import RaggedLM, losses_of, tiny_gpt2
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.performance.estimate import ModelShape, estimate
from scaletrain.performance.memory import TensorPeakTracker, parse_bytes
from scaletrain.middleware.batch_finder import BatchSizeError, choose, search_capacity

STEPS = 6
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); the loss is a
# mean over ~600 targets, so rounding errors largely average out. Measured on
# this model: bf16 within 1.5e-4 and fp16 within 6e-5 (relative) of fp32 over
# 6 steps. 1e-2 (about five bf16 ulps) leaves room for other CPUs while a real
# fault (unscaled fp16 gradients: updates 65536x too large; the wrong weights
# in the optimizer) moves the loss by far more.
PRECISION_RTOL = 1e-2


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1,
                learning_rate=1e-2, disable_tqdm=True, save_strategy="no", optim="adamw_torch", seed=0)
    return TrainingArguments(**{**base, **kw})


def _train(out, model=None, callbacks=None, **kw) -> Trainer:
    trainer = Trainer(model=model if model is not None else tiny_gpt2(), args=_args(out, **kw),
                      train_dataset=RaggedLM(64), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    return losses_of(_train(tmp_path_factory.mktemp("fp32")))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_the_fp32_loss_curve(precision, tmp_path, fp32_losses):
    trainer = _train(tmp_path, **{precision: True})
    losses = losses_of(trainer)
    np.testing.assert_allclose(losses, fp32_losses, rtol=PRECISION_RTOL)
    # and it really ran in low precision: a repeated fp32 run is bit-identical
    assert max(abs(a - b) for a, b in zip(losses, fp32_losses, strict=True)) > 1e-6
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["skipped_steps"] == 0 for e in logs)
    assert ("loss_scale" in logs[0]) == (precision == "fp16")


class InjectInf(TrainerCallback):
    """Puts an inf into one gradient element during the backward of step
    `at_step` (1-based) on rank `on_rank`: the loss scaler must skip that step."""

    def __init__(self, at_step: int, on_rank: int = 0) -> None:
        self.at_step, self.on_rank = at_step, on_rank
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, float] = {}
        self.trainer = None

    def attach(self, trainer) -> None:
        self.trainer = trainer
        module = trainer.model.transformer.h[0].mlp.c_fc

        def pre_forward(mod, inputs):
            due = trainer.state.global_step + 1 == self.at_step and trainer.strategy.rank == self.on_rank
            if due and mod.training and torch.is_grad_enabled():
                handle = None

                def poison_once(grad: torch.Tensor) -> torch.Tensor:
                    handle.remove()  # a parameter's hooks outlive the backward
                    grad = grad.clone()
                    grad.view(-1)[0] = float("inf")
                    return grad

                handle = mod.weight.register_hook(poison_once)

        module.register_forward_pre_hook(pre_forward)

    def on_step_end(self, args, state, control, **kwargs):
        from scaletrain.performance.memory import local_shard

        model = self.trainer.strategy.unwrap(self.trainer.model_wrapped)
        self.weights[state.global_step] = {n: local_shard(p).detach().clone() for n, p in model.named_parameters()}
        self.lrs[state.global_step] = self.trainer.lr_scheduler.get_last_lr()[0]


def check_overflow_step_was_skipped(trainer, injector: InjectInf) -> None:
    """Shared with the 2-rank test: the poisoned step left every weight and the
    LR schedule where they were, halved the scale, and was counted."""
    k = injector.at_step
    before, after = injector.weights[k - 1], injector.weights[k]
    assert all(torch.equal(before[n], after[n]) for n in before), "weights moved on the overflow step"
    assert not all(torch.equal(after[n], injector.weights[k + 1][n]) for n in after), "training stopped"
    assert injector.lrs[k] == injector.lrs[k - 1]
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert logs[k]["skipped_steps"] == logs[k - 1]["skipped_steps"] + 1
    assert logs[k]["loss_scale"] == logs[k - 1]["loss_scale"] / 2
    assert logs[STEPS]["skipped_steps"] == logs[k]["skipped_steps"]


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    injector = InjectInf(at_step=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, fp16=True), train_dataset=RaggedLM(64),
                      callbacks=[injector])
    injector.attach(trainer)
    trainer.train()
    check_overflow_step_was_skipped(trainer, injector)


def test_fp16_loss_scale_is_checkpointed_and_restored(tmp_path):
    injector = InjectInf(at_step=2)
    first = Trainer(model=tiny_gpt2(), args=_args(tmp_path, fp16=True, save_strategy="steps", save_steps=3),
                    train_dataset=RaggedLM(64), callbacks=[injector])
    injector.attach(first)
    first.train()
    resumed = Trainer(model=tiny_gpt2(seed=5), args=_args(tmp_path, fp16=True), train_dataset=RaggedLM(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    scale_at_3 = next(e["loss_scale"] for e in first.state.log_history if e.get("step") == 3 and "loss" in e)
    assert scale_at_3 == 65536.0 / 2  # the overflow at step 2 halved it
    assert losses_of(resumed)[3:] == losses_of(first)[3:]
    resumed_logs = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 3]
    assert resumed_logs[0]["loss_scale"] == scale_at_3 and resumed_logs[0]["skipped_steps"] == 1


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every_n_layers):
    torch.manual_seed(0)
    batch = {k: torch.stack([RaggedLM(8)[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}

    def gradients_and_peak(checkpointing: bool):
        model = tiny_gpt2()
        model.config.resid_pdrop = model.config.attn_pdrop = 0.1  # dropout must be replayed identically
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        if checkpointing:
            from scaletrain.middleware import ActivationCheckpointing

            ActivationCheckpointing({"every_n_layers": every_n_layers}).transform_model(model, _CPU)
        model.train()
        torch.manual_seed(1)
        with TensorPeakTracker() as tracker:
            model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, tracker.peak

    plain, plain_peak = gradients_and_peak(False)
    checkpointed, checkpointed_peak = gradients_and_peak(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0)  # the same ops, replayed
    assert checkpointed_peak < plain_peak  # activations were really dropped


def test_activation_checkpointing_fields_drop_activations_and_keep_the_losses(tmp_path):
    """Through the trainer's own arguments, on 4 blocks: checkpointing every second block, then every block,
    lowers the measured peak of a training micro-step (the last block's activations are live at the start of
    backward either way, so 2 blocks could not tell the two apart), and training replays the same ops."""
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2().config
    config.n_layer = 4
    runs = {}
    for name, kw in (("off", {}), ("every 2nd", {"activation_checkpointing_kwargs": {"every_n_layers": 2}}),
                     ("every", {})):
        torch.manual_seed(0)
        trainer = _train(tmp_path / name, model=GPT2LMHeadModel(config), activation_checkpointing=name != "off", **kw)
        runs[name] = (losses_of(trainer), trainer.measure_step_memory(32))
    # measured: 8.4, 5.0 and 3.3 MiB
    assert runs["off"][1] > 1.4 * runs["every 2nd"][1] > 1.4 ** 2 * runs["every"][1], runs
    assert runs["off"][0] == runs["every 2nd"][0] == runs["every"][0]


def test_selective_checkpointing_keeps_the_gradients_and_sits_between_none_and_full():
    """torchtitan's per-op policy: every other matmul's output and the attention output are kept, the rest of
    each block recomputed. Gradients bit-identical; the measured peak between no and full checkpointing, as
    the estimator predicts (a Llama block: SDPA and matmuls, the policy's ops)."""
    from helpers import tiny_llama
    from scaletrain.middleware import ActivationCheckpointing

    ids = torch.randint(0, 64, (4, 256), generator=torch.Generator().manual_seed(0))

    def run(kwargs):
        model = tiny_llama(hidden_size=128, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=256)
        if kwargs is not None:
            ActivationCheckpointing(kwargs).transform_model(model, _CPU)
        model.train()
        with TensorPeakTracker() as tracker:
            model(input_ids=ids, labels=ids).loss.backward()
        return tracker.peak, [p.grad for p in model.parameters()]

    (none, plain), (full, _), (selective, grads) = run(None), run({}), run({"selective": True})
    for a, b in zip(plain, grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert full < selective < none, (full, selective, none)  # measured: 24, 35, 59 MiB
    shape = ModelShape.of(tiny_llama(hidden_size=128, intermediate_size=512, num_hidden_layers=4))
    predicted = [estimate(shape, "single", 1, micro_batch=4, seq_len=256, checkpointing=c, selective=sel).activations
                 for c, sel in ((1, False), (1, True), (0, False))]
    assert predicted == sorted(predicted)
    with pytest.raises(ValueError, match="selective='yes' must be true or false"):
        TrainingArguments(output_dir="unused", activation_checkpointing=True,
                          activation_checkpointing_kwargs={"selective": "yes"})


class _CPU:
    device = torch.device("cpu")


# ------------------------------------------------------------------ batch finder
def _memory_curves(rnd: random.Random, upper: int) -> dict:
    """Peak bytes vs micro-batch, monotone. The finder fits a line; real curves bend: the first extra row
    costs less than later ones (measured on tiny GPT-2 here: +85 KiB, then +133 KiB a row), allocators round
    up to blocks, attention-like terms grow faster than linearly, shared buffers slower."""
    fixed, per_row, bend = rnd.uniform(1e6, 1e9), rnd.uniform(1e5, 1e8), rnd.uniform(0.05, 1.0)
    block = per_row * bend / 2
    return {
        "linear": lambda b: int(fixed + per_row * b),
        "cheap first row": lambda b: int(fixed + per_row * b - (b > 1) * per_row * bend / 2),
        "convex": lambda b: int(fixed + per_row * b + per_row * bend / upper * b * b),
        "concave": lambda b: int(fixed + per_row * upper * (b / upper) ** (1 - 0.3 * bend)),
        "allocator blocks": lambda b: int(math.ceil((fixed + per_row * b) / block) * block),
    }


def _largest_fitting(measure, budget: float, upper: int) -> int:
    """Plain bisection on a monotone curve: the reference the finder's answer is held to."""
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if measure(mid) <= budget else (lo, mid - 1)
    return lo


def test_search_finds_the_boundary_of_curved_memory_within_the_probe_bound():
    rnd = random.Random(0)
    for _ in range(400):
        upper = rnd.choice([4, 8, 16, 32, 64, 100, 512, 4096])
        fraction = rnd.uniform(0.02, 0.98)
        for shape, measure in _memory_curves(rnd, upper).items():
            budget = measure(1) + fraction * (measure(upper) - measure(1))
            true_max = _largest_fitting(measure, budget, upper)
            capacity, probes = search_capacity(measure, budget, upper)
            case = (shape, upper, true_max, probes)
            # whatever the shape: the answer fits, and is within the finder's 5% resolution of the largest that does
            assert measure(capacity) <= budget and capacity * 1.05 >= true_max, case
            assert len({b for b, _ in probes}) == len(probes) and all(1 <= b <= upper for b, _ in probes), case
            # a bisection's probes, plus the first and one more, on the shapes the line fits; a bent curve can
            # cost one probe more (it did in ~1% of these cases)
            near_linear = shape in ("linear", "cheap first row")
            assert len(probes) <= math.ceil(math.log2(upper)) + (2 if near_linear else 3), case


def test_choice_keeps_the_global_batch_and_refuses_an_impossible_budget():
    choice = choose(lambda b: 1000 + 100 * b, budget=1000 + 100 * 23, per_device=32, accumulation=2)
    assert choice.capacity == 23 and choice.per_device == 16 and choice.accumulation == 4
    with pytest.raises(BatchSizeError, match="a micro-batch of 1 already needs"):
        choose(lambda b: 10**9, budget=10**6, per_device=8, accumulation=1)


def test_single_process_finder_picks_a_fitting_batch_and_trains_like_the_chosen_config(tmp_path):
    found = _train(tmp_path / "found", per_device_train_batch_size=32, auto_find_batch_size=True,
                   batch_finder_memory_budget="1.5MiB")
    choice = found.batch_size_choice
    assert choice.per_device * choice.accumulation == 32 and choice.per_device < 32
    # every micro-batch measured the same way after training: the probes' peaks are reproduced exactly,
    # and the exhaustive maximum under the budget is the finder's answer (within its 5% resolution)
    peaks = {b: found.measure_step_memory(b) for b in range(1, 33)}
    assert all(peaks[b] == peak for b, peak in choice.probes), (choice.probes, peaks)
    true_max = max(b for b, peak in peaks.items() if peak <= parse_bytes("1.5MiB"))
    assert true_max / 1.05 <= choice.capacity <= true_max < 32, (choice.capacity, true_max)
    assert len(choice.probes) <= math.ceil(math.log2(32)) + 2, choice.probes
    direct = _train(tmp_path / "direct", per_device_train_batch_size=choice.per_device,
                    gradient_accumulation_steps=choice.accumulation)
    # the probes left no trace: same weights, RNG and schedule as a run configured directly
    assert losses_of(found) == losses_of(direct)


# --------------------------------------------------------------------- estimator
def test_estimator_formulas():
    shape = ModelShape(parameters=1_000_000, largest_block=100_000, hidden=256, heads=4, layers=4, vocab=1000)
    psi = 1_000_000
    single = estimate(shape, "single", 1)
    assert (single.parameters, single.gradients, single.optimizer) == (4 * psi, 4 * psi, 8 * psi)
    fsdp = estimate(shape, "fsdp", 8)
    assert fsdp.model_states == pytest.approx(16 * psi / 8)
    z3 = estimate(shape, "zero3", 64, "bf16")  # ZeRO paper: 16Ψ/N in mixed precision
    assert z3.model_states == pytest.approx(16 * psi / 64)
    z2 = estimate(shape, "zero2", 64, "bf16")
    assert z2.model_states == pytest.approx(2 * psi + 14 * psi / 64)
    offloaded = estimate(shape, "zero3", 8, "bf16", offload_optimizer=True, offload_params=True)
    assert offloaded.optimizer == 0 and offloaded.parameters == 0 and offloaded.offloaded == pytest.approx(14 * psi / 8)
    plain = estimate(shape, "single", 1, micro_batch=8, seq_len=512)
    checkpointed = estimate(shape, "single", 1, micro_batch=8, seq_len=512, checkpointing=1)
    every_other = estimate(shape, "single", 1, micro_batch=8, seq_len=512, checkpointing=2)
    assert checkpointed.activations < every_other.activations < plain.activations
    assert checkpointed.activations < plain.activations / 2


# ---------------------------------------------------------------- misconfiguration
@pytest.mark.parametrize("kw, error, message", [
    ({"bf16": True, "fp16": True}, ValueError, "choose one"),
    ({"strategy": "zero2", "fp16": True}, NotSupportedError, "DeepSpeed refuses fp16 on CPU. Use bf16=True"),
    ({"auto_find_batch_size": True, "batch_finder_memory_budget": "lots"}, ValueError, "write e.g. '6GiB'"),
    ({"batch_finder_memory_budget": "1GiB"}, ValueError, "auto_find_batch_size is False"),
    ({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
     NotSupportedError, "use_reentrant=True is not supported"),
    ({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"every_n_layers": 0}},
     ValueError, "every_n_layers=0"),
    ({"activation_checkpointing_kwargs": {"every_n_layers": 2}}, ValueError, "activation_checkpointing is off"),
])
def test_memory_options_that_cannot_work_are_refused(kw, error, message):
    from scaletrain.strategies import build_strategy

    with pytest.raises(error, match=message):
        build_strategy(TrainingArguments(output_dir="unused", **kw))


def test_hf_gradient_checkpointing_names_still_work():
    args = TrainingArguments(output_dir="unused", gradient_checkpointing=True,
                             gradient_checkpointing_kwargs='{"every_n_layers": 2}')
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"every_n_layers": 2}


class EmbeddingNoise(TrainerCallback):
    """How far the input embedding's training-mode output is from the plain lookup, during training."""

    def __init__(self) -> None:
        self.deviations: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        embeddings = model.get_input_embeddings()
        ids = torch.arange(12).reshape(2, 6)
        with torch.no_grad():
            self.deviations.append((embeddings(ids) - F.embedding(ids, embeddings.weight)).abs().max().item())


def test_neftune_adds_bounded_noise_in_training_only_and_is_removed_after(tmp_path):
    alpha = 5.0
    noise = EmbeddingNoise()
    noisy = _train(tmp_path / "noisy", callbacks=[noise], neftune_noise_alpha=alpha)
    plain = _train(tmp_path / "plain")
    bound = alpha / (6 * noisy.model.config.n_embd) ** 0.5  # HF's alpha / sqrt(sequence length x width)
    assert len(noise.deviations) == STEPS and all(0 < d <= bound for d in noise.deviations)
    assert losses_of(noisy) != losses_of(plain)  # the noise reached the training forwards
    embeddings = noisy.model.get_input_embeddings()
    embeddings.train()
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(embeddings(ids), F.embedding(ids, embeddings.weight))  # hook gone after train()
