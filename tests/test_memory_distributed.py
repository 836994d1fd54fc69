"""Memory middleware on 2 real gloo ranks, one spawned job per strategy:
activation checkpointing leaves gradients unchanged, bf16/fp16 track fp32,
an fp16 overflow on one rank skips the step on every rank, the batch finder
lands within 10% of the exhaustively probed maximum, the estimator predicts the
measured model state, and (ddp) accumulation is exact on ragged batches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from helpers import RaggedLM, losses_of, run_ranks
from scaletrain import Trainer, TrainingArguments
from scaletrain.strategies import Strategy, build_strategy
from test_memory_middleware import PRECISION_RTOL, STEPS, InjectInf, check_overflow_step_was_skipped

FINDER_RANGE = 32  # per-rank batch the finder may split: per_device 32 x accumulation 1
FINDER_STRATEGIES = {"ddp", "fsdp", "zero3"}
FP16_STRATEGIES = {"ddp", "fsdp"}  # DeepSpeed fp16 needs a GPU (CPU_NOTES)
ESTIMATE_RTOL = 0.15


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS,
                logging_steps=1, learning_rate=1e-2, max_grad_norm=0.5, disable_tqdm=True, save_strategy="no",
                optim="adamw_torch", seed=0, ddp_timeout=120)
    return TrainingArguments(**{**base, **kw})


def _trainer(out, pretrained: str, callbacks=None, dataset_size: int = 64, **kw) -> Trainer:
    from transformers import AutoConfig, GPT2LMHeadModel

    args = _args(out, **kw)
    strategy = build_strategy(args)
    strategy.setup_environment()
    model = strategy.build_model(lambda: GPT2LMHeadModel.from_pretrained(pretrained),
                                 lambda: GPT2LMHeadModel._from_config(AutoConfig.from_pretrained(pretrained)))
    return Trainer(model=model, args=args, train_dataset=RaggedLM(dataset_size), callbacks=callbacks,
                   strategy=strategy)


def _grad_norms(trainer) -> list[float]:
    return [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]


def _job(rank: int, out: str, pretrained: str, big_pretrained: str, strategy: str) -> None:
    # first, while this process holds no other model
    result: dict = {"model_state": _measured_model_state(out, big_pretrained, strategy)}

    def run(name, **kw):
        trainer = _trainer(f"{out}/{name}", pretrained, strategy=strategy, **kw)
        trainer.train()
        trainer.save_model(f"{out}/{name}/export")
        result[name] = {"losses": losses_of(trainer), "grad_norms": _grad_norms(trainer)}
        return trainer

    run("fp32")
    run("checkpointed", activation_checkpointing=True)
    run("checkpointed_every_2", activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2})
    run("bf16", bf16=True)

    if strategy in FP16_STRATEGIES:
        # the inf lands in rank 0's shard (element 0), injected on rank 1
        injector = InjectInf(at_step=3, on_rank=1)
        trainer = _trainer(f"{out}/fp16", pretrained, strategy=strategy, fp16=True, callbacks=[injector])
        injector.attach(trainer)
        trainer.train()
        check_overflow_step_was_skipped(trainer, injector)  # on this rank
        result["fp16"] = {"losses": losses_of(trainer)}

    if strategy in FINDER_STRATEGIES:
        result["finder"] = _finder_checks(out, pretrained, strategy)

    if strategy == "ddp":
        result["accumulation"] = _accumulation_runs(out, pretrained)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def _finder_checks(out: str, pretrained: str, strategy: str) -> dict:
    """Exhaustive probing finds the true maximum under a budget; the finder,
    run with that budget, must come within 10% in few probes, keep the global
    batch, and then train exactly like a run configured with its choice."""
    probe = _trainer(f"{out}/probe", pretrained, strategy=strategy, per_device_train_batch_size=FINDER_RANGE)
    probe._setup_model()
    peaks = {b: probe.measure_step_memory(b) for b in range(1, FINDER_RANGE + 1)}
    budget = peaks[1] + int(0.6 * (peaks[FINDER_RANGE] - peaks[1]))
    true_max = max(b for b, peak in peaks.items() if peak <= budget)

    found = _trainer(f"{out}/found", pretrained, strategy=strategy, per_device_train_batch_size=FINDER_RANGE,
                     auto_find_batch_size=True, batch_finder_memory_budget=str(budget), max_steps=3,
                     dataset_size=256)
    found.train()
    choice = found.batch_size_choice
    direct = _trainer(f"{out}/direct", pretrained, strategy=strategy, per_device_train_batch_size=choice.per_device,
                      gradient_accumulation_steps=choice.accumulation, max_steps=3, dataset_size=256)
    direct.train()
    return {"true_max": true_max, "capacity": choice.capacity, "probes": len(choice.probes),
            "per_device": choice.per_device, "accumulation": choice.accumulation,
            "found_losses": losses_of(found), "direct_losses": losses_of(direct),
            "monotone": all(peaks[b] <= peaks[b + 1] for b in range(1, FINDER_RANGE))}


def _measured_model_state(out: str, big_pretrained: str, strategy: str) -> dict:
    """Live tensor bytes at the optimizer step of step 2 (parameters, gradients,
    optimizer state all allocated, activations freed) vs the estimator."""
    from transformers import TrainerCallback

    from scaletrain.performance.estimate import ModelShape, estimate
    from scaletrain.performance.memory import live_tensor_bytes

    measured = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                measured["bytes"] = live_tensor_bytes(trainer.strategy.device,
                                                      trainer.strategy.unwrap(trainer.model_wrapped))

    trainer = _trainer(f"{out}/big", big_pretrained, strategy=strategy, max_steps=2, callbacks=[Measure()])
    from transformers import GPT2LMHeadModel

    shape = ModelShape.of(GPT2LMHeadModel.from_pretrained(big_pretrained))
    trainer.train()
    predicted = estimate(shape, strategy, trainer.strategy.world_size, "fp32")
    return {"measured": measured["bytes"], "predicted": predicted.model_states}


def _accumulation_runs(out: str, pretrained: str) -> dict:
    runs = {}
    for per_device, accumulation in ((2, 4), (8, 1)):
        trainer = _trainer(f"{out}/acc-{per_device}", pretrained, strategy="ddp", optim="sgd", learning_rate=0.5,
                           per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                           max_grad_norm=0.0)
        trainer.train()
        trainer.save_model(f"{out}/acc-{per_device}/export")
        runs[f"{per_device}x{accumulation}"] = losses_of(trainer)
    return runs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "export" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def big_pretrained(tmp_path_factory) -> str:
    """Large enough (0.47M parameters) that stray tensors (data rows, RNG
    state) are well under 1% of the model state being measured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=16, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                               pad_token_id=0)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pretrained):
    """One process, global batch 8 (= 2 ranks x 4) in fp32; plus its model state
    measured in a process of its own (1 rank) and the 16-row SGD run that the
    ddp job's accumulation runs must reproduce."""
    from transformers import GPT2LMHeadModel

    out = tmp_path_factory.mktemp("reference")
    fp32 = Trainer(model=GPT2LMHeadModel.from_pretrained(pretrained),
                   args=_args(out, per_device_train_batch_size=8, strategy="single"), train_dataset=RaggedLM(64))
    fp32.train()
    sgd = Trainer(model=GPT2LMHeadModel.from_pretrained(pretrained),
                  args=_args(out / "sgd", per_device_train_batch_size=16, strategy="single", optim="sgd",
                             learning_rate=0.5, max_grad_norm=0.0), train_dataset=RaggedLM(64))
    sgd.train()
    sgd.save_model(str(out / "sgd" / "export"))
    return {"losses": losses_of(fp32), "sgd_losses": losses_of(sgd), "sgd_dir": out / "sgd"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_memory_middleware_on_two_ranks(strategy, tmp_path, pretrained, big_pretrained, reference):
    run_ranks(_job, str(tmp_path), pretrained, big_pretrained, strategy, timeout=420)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    got = ranks[0]

    # fp32 matches one process (the contract suite's 1e-5), and activation
    # checkpointing replays the same ops: losses, gradient norms and weights
    # agree to fp32 rounding. Measured: identical.
    np.testing.assert_allclose(got["fp32"]["losses"], reference["losses"], rtol=1e-5)
    for name in ("checkpointed", "checkpointed_every_2"):
        np.testing.assert_allclose(got[name]["losses"], got["fp32"]["losses"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name]["grad_norms"], got["fp32"]["grad_norms"], rtol=1e-6, err_msg=name)
        assert _max_diff(_weights(tmp_path / name), _weights(tmp_path / "fp32")) < 1e-6, name

    # bf16 through this strategy's own mechanism tracks fp32 (see PRECISION_RTOL)
    np.testing.assert_allclose(got["bf16"]["losses"], reference["losses"], rtol=PRECISION_RTOL)
    assert max(abs(a - b) for a, b in zip(got["bf16"]["losses"], reference["losses"], strict=True)) > 1e-6

    if strategy in FP16_STRATEGIES:
        assert ranks[0]["fp16"]["losses"] == ranks[1]["fp16"]["losses"]  # both ranks took the same steps

    if strategy in FINDER_STRATEGIES:
        finder = got["finder"]
        assert finder["monotone"]
        assert 0.9 * finder["true_max"] <= finder["capacity"] <= finder["true_max"], finder
        assert finder["probes"] <= math.ceil(math.log2(FINDER_RANGE)) + 2, finder
        assert finder["per_device"] * finder["accumulation"] == FINDER_RANGE  # the global batch is kept
        assert finder["found_losses"] == finder["direct_losses"]  # the probes left no trace

    # parameters + gradients + optimizer state per rank, measured vs predicted
    for r in ranks:
        state = r["model_state"]
        assert abs(state["measured"] / state["predicted"] - 1) < ESTIMATE_RTOL, state

    if strategy == "ddp":
        # k micro-batches of b == one batch of k*b on ragged rows, across 2 ranks
        # (SGD: weight error bounds gradient error). Measured: within 2e-7.
        for key, losses in got["accumulation"].items():
            np.testing.assert_allclose(losses, reference["sgd_losses"], rtol=1e-6, err_msg=key)
            per_device = key.split("x")[0]
            assert _max_diff(_weights(tmp_path / f"acc-{per_device}"), _weights(reference["sgd_dir"])) < 1e-6, key


def test_single_process_model_state_matches_the_estimate(tmp_path, big_pretrained):
    run_ranks(_single_state_job, str(tmp_path), big_pretrained, world_size=1)
    state = json.loads((tmp_path / "state.json").read_text())
    assert abs(state["measured"] / state["predicted"] - 1) < ESTIMATE_RTOL, state


def _single_state_job(rank: int, out: str, big_pretrained: str) -> None:
    Path(out, "state.json").write_text(json.dumps(_measured_model_state(out, big_pretrained, "single")))


# ------------------------------------------------ the batch finder under ZeRO-1/2
# DeepSpeedStrategy.discard_gradients has a branch per ZeRO optimizer; each run reaches one. name ->
# (arguments, the optimizer DeepSpeed wraps the model's in, whether the generic zero_grad is shown to fail there)
ZERO_FINDER_RUNS = {
    "zero1": ({"strategy": "zero1"}, "DeepSpeedZeroOptimizer", False),
    "zero2": ({"strategy": "zero2"}, "DeepSpeedZeroOptimizer", False),
    # ZeRO-1 with bf16 weights and fp32 gradient accumulation is DeepSpeed's BF16_Optimizer
    "zero1-bf16": ({"strategy": "zero1", "bf16": True, "deepspeed": {"data_types": {"grad_accum_dtype": "fp32"}}},
                   "BF16_Optimizer", True),
    "zero2-bf16": ({"strategy": "zero2", "bf16": True}, "DeepSpeedZeroOptimizer", False),
}
# offloaded, stage 1/2 add each backward into host buffers while the micro-step count is > 0: a count the
# probes left behind would add the next step's gradients to theirs
# no generic-discard guard here: the generic zero_grad(set_to_none=True) drops the offloaded partitions'
# gradient buffers, which fails outright rather than leaving a probe's gradients in
ZERO_OFFLOAD_FINDER_RUNS = {
    "zero1-offload": ({"strategy": "zero1", "offload_optimizer": True}, "DeepSpeedZeroOptimizer", False),
    "zero2-offload": ({"strategy": "zero2", "offload_optimizer": True}, "DeepSpeedZeroOptimizer", False),
}
ZERO_FINDER_BATCH = 8  # per rank; the budget below lets 4 rows fit and not 5, so 4 x 2 accumulation is chosen


class _GradientsAtTrainBegin(TrainerCallback):
    """What the ZeRO optimizer holds when training begins, i.e. right after the finder's probes: any
    gradient left in its buffers would be added into the first real step."""

    def __init__(self) -> None:
        self.trainer, self.seen = None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        zero = self.trainer.strategy.engine.optimizer
        params = [p for group in getattr(zero, "bf16_groups", None) or zero.bit16_groups for p in group]
        self.seen = {"optimizer": type(zero).__name__, "param_grads": sum(p.grad is not None for p in params)}
        if isinstance(zero, BF16_Optimizer):
            self.seen["buffered"] = sum(float(f.abs().sum()) for f in zero.fp32_groups_gradients_flat) + \
                sum(any(has) for has in zero.fp32_groups_has_gradients)
        else:
            self.seen["buffered"] = sum(v is not None for v in zero.averaged_gradients.values()) + \
                sum(v is not None for v in zero.all_grad_tensors.values())
            self.seen["micro_step_reset"] = zero.micro_step_id == INITIAL_MICRO_STEP_ID


def _zero_finder_run(out: str, pretrained: str, extra: dict, guard: bool) -> dict:
    """Probe budget -> finder run -> a run configured with its choice (-> with `guard`, a finder run whose
    probes are dropped the generic way, by optimizer.zero_grad)."""
    # SGD: the update is linear in the gradient, so a stray probe gradient shows in the weights as it is
    common = dict(optim="sgd", learning_rate=0.5, max_steps=3, dataset_size=128, **extra)
    probe = _trainer(f"{out}/probe", pretrained, per_device_train_batch_size=ZERO_FINDER_BATCH, **common)
    probe._setup_model()
    budget = (probe.measure_step_memory(4) + probe.measure_step_memory(5)) // 2

    def run(name, finder: bool, generic_discard: bool = False, **kw):
        trace = _GradientsAtTrainBegin()
        finder_kw = dict(auto_find_batch_size=True, batch_finder_memory_budget=str(budget)) if finder else {}
        trainer = _trainer(f"{out}/{name}", pretrained, callbacks=[trace], **common, **kw, **finder_kw)
        trace.trainer = trainer
        if generic_discard:
            trainer.strategy.discard_gradients = lambda model, optimizer: Strategy.discard_gradients(
                trainer.strategy, model, optimizer)
        trainer.train()
        weights = trainer.strategy.full_model_state_dict(trainer.model_wrapped)
        return trainer, {"losses": losses_of(trainer), "grad_norms": _grad_norms(trainer), "trace": trace.seen}, weights

    found, result, found_weights = run("found", True, per_device_train_batch_size=ZERO_FINDER_BATCH)
    choice = found.batch_size_choice
    result.update(capacity=choice.capacity, per_device=choice.per_device, accumulation=choice.accumulation,
                  probes=[b for b, _ in choice.probes])
    _, result["direct"], direct_weights = run("direct", False, per_device_train_batch_size=choice.per_device,
                                              gradient_accumulation_steps=choice.accumulation)
    result["weight_diff"] = _max_diff(found_weights, direct_weights)
    if guard:
        _, result["generic"], generic_weights = run("generic", True, generic_discard=True,
                                                    per_device_train_batch_size=ZERO_FINDER_BATCH)
        result["generic_weight_diff"] = _max_diff(generic_weights, direct_weights)
    return result


def _zero_finder_job(rank: int, out: str, pretrained: str, runs: dict) -> None:
    result = {name: _zero_finder_run(f"{out}/{name}", pretrained, extra, guard)
              for name, (extra, _, guard) in runs.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def _zero_finder_results(out: Path, pretrained: str, runs: dict) -> list[dict]:
    """One 2-rank job for all of `runs`; each rank's results."""
    run_ranks(_zero_finder_job, str(out), pretrained, runs, timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_zero_finder_run(ranks: list[dict], runs: dict, name: str) -> None:
    """After the probes the ZeRO optimizer holds nothing, and the first real step (and every later one)
    is the step of a run configured with the chosen sizes, to the bit: the same ops on the same data."""
    _, optimizer, guard = runs[name]
    got = ranks[0][name]
    assert got["trace"]["optimizer"] == optimizer, name  # the branch this run is meant to reach
    assert got["trace"]["param_grads"] == 0 and got["trace"]["buffered"] == 0, (name, got["trace"])
    assert got["trace"].get("micro_step_reset", True), name
    # peak(4) < budget < peak(5): capacity 4, and 4 x 2 keeps the per-rank batch of 8
    assert (got["capacity"], got["per_device"], got["accumulation"]) == (4, 4, 2), (name, got)
    assert len(got["probes"]) > 1 and max(got["probes"]) >= 5, got["probes"]  # real backwards ran first
    assert got["losses"] == got["direct"]["losses"], name
    assert got["grad_norms"] == got["direct"]["grad_norms"], name
    assert got["weight_diff"] == 0.0, name
    assert ranks[1][name]["losses"] == got["losses"], name  # both ranks report the global loss
    if guard:  # the comparison can fail: the generic zero_grad leaves a probe's gradients in the first step
        assert got["generic"]["trace"]["buffered"] > 0, name
        assert got["generic"]["grad_norms"][0] > 1.5 * got["direct"]["grad_norms"][0], name
        assert got["generic_weight_diff"] > 1e-3, name


def test_batch_finder_drops_probe_gradients_under_zero1_and_zero2(tmp_path, pretrained):
    """The finder's probes run real backwards through the ZeRO-1/2 optimizers (and DeepSpeed's BF16_Optimizer);
    DeepSpeedStrategy.discard_gradients must leave the next step exactly as if they had not run."""
    ranks = _zero_finder_results(tmp_path, pretrained, ZERO_FINDER_RUNS)
    for name in ZERO_FINDER_RUNS:
        _check_zero_finder_run(ranks, ZERO_FINDER_RUNS, name)


# ZeRO-1/2 with the optimizer offloaded: the torch optimizer's parameters are DeepSpeed's fp32 partitions,
# whose .grad DeepSpeed allocates once and copies into every backward; a zero_grad(set_to_none=True) after
# the step (as the trainer does for the other backends) broke the second step here
def test_batch_finder_drops_probe_gradients_with_the_optimizer_offloaded(tmp_path, pretrained):
    ranks = _zero_finder_results(tmp_path, pretrained, ZERO_OFFLOAD_FINDER_RUNS)
    for name in ZERO_OFFLOAD_FINDER_RUNS:
        _check_zero_finder_run(ranks, ZERO_OFFLOAD_FINDER_RUNS, name)
