"""Paths that only a CUDA machine has (`make test-gpu`; benchmarks/gpu.sh runs them first): DeepSpeed fp16 with
its dynamic loss scale, DeepSpeed's CPU Adam in place of torch's AdamW when the optimizer is offloaded, and DDP
over NCCL against one process. Skipped where torch sees no CUDA device (conftest.py); TF32 and use_cpu on a
GPU are in test_trainer.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from test_memory_middleware import InjectInf

pytestmark = pytest.mark.gpu
STEPS = 8


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1,
                learning_rate=1e-3, disable_tqdm=True, save_strategy="no", optim="adamw_torch", seed=0,
                report_to="none", ddp_timeout=300)
    return TrainingArguments(**{**base, **kw})


def _weights(trainer) -> dict[str, torch.Tensor]:
    state = trainer.strategy.full_model_state_dict(trainer.model_wrapped)
    return {k: v.detach().float().cpu() for k, v in state.items()}


def test_deepspeed_fp16_skips_overflow_steps_and_halves_the_scale_after_its_hysteresis(tmp_path):
    """DeepSpeed's dynamic loss scale (its defaults: hysteresis 2, window 1000): an overflow skips the step
    (weights and LR schedule stay, the step is counted); the first one spends the hysteresis, the second
    halves the scale. The initial scale is 2^10 so the tiny model's own gradients never overflow."""
    injectors = [InjectInf(at_step=3), InjectInf(at_step=5)]
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, strategy="zero2", fp16=True,
                                                    deepspeed={"fp16": {"initial_scale_power": 10}}),
                      train_dataset=RaggedLM(64), callbacks=injectors)
    for injector in injectors:
        injector.attach(trainer)
    trainer.train()
    assert trainer.strategy.engine.fp16_enabled()
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    weights, lrs = injectors[0].weights, injectors[0].lrs
    assert [logs[s]["loss_scale"] for s in range(1, STEPS + 1)] == [1024.0] * 4 + [512.0] * 4
    assert [logs[s]["skipped_steps"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 2, 2, 2, 2]
    for step in range(2, STEPS + 1):
        moved = not all(torch.equal(weights[step - 1][n], weights[step][n]) for n in weights[step])
        assert moved == (step not in (3, 5)), step  # exactly the overflow steps left the weights where they were
        assert (lrs[step] == lrs[step - 1]) == (step in (3, 5)), step  # and the schedule
    assert all(np.isfinite(logs[s]["loss"]) for s in logs)


def test_deepspeed_cpu_adam_steps_the_offloaded_optimizer_like_torch_adamw(tmp_path):
    """With offload_optimizer on a GPU host the strategy hands DeepSpeed its vectorised CPU Adam, built from
    the AdamW the trainer made (same hyperparameters, AdamW's decoupled decay); the run follows one with
    torch's AdamW on the GPU. ZeRO-3: zero1/zero2 with offload fail at step 2 (see test_memory_distributed)."""
    common = dict(strategy="zero3", learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.1,
                  adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7)
    offloaded = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "offloaded", offload_optimizer=True, **common),
                        train_dataset=RaggedLM(64))
    offloaded.train()
    on_gpu = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "on_gpu", **common), train_dataset=RaggedLM(64))
    on_gpu.train()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cpu_adam = offloaded.strategy.engine.optimizer.optimizer
    assert isinstance(cpu_adam, DeepSpeedCPUAdam) and cpu_adam.adam_w_mode
    assert not isinstance(on_gpu.strategy.engine.optimizer.optimizer, DeepSpeedCPUAdam)
    decayed = [g for g in cpu_adam.param_groups if g["weight_decay"]]
    assert decayed and all((g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.8, 0.95), 1e-7, 0.1)
                           for g in decayed)
    assert all(p.device.type == "cpu" for g in cpu_adam.param_groups for p in g["params"])
    # fp32 both; CPU and GPU sum in different orders (~1e-7), which Adam's normalisation can amplify
    np.testing.assert_allclose(losses_of(offloaded), losses_of(on_gpu), rtol=1e-4)
    ours, reference = _weights(offloaded), _weights(on_gpu)
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) < 1e-3


def _nccl_job(rank: int, out: str) -> None:
    trainer = Trainer(model=tiny_gpt2(), args=_args(f"{out}/ddp", strategy="ddp", per_device_train_batch_size=4,
                                                    optim="sgd", learning_rate=0.5),
                      train_dataset=RaggedLM(64))
    trainer.train()
    result = {"backend": torch.distributed.get_backend(), "device": str(trainer.strategy.device),
              "losses": losses_of(trainer)}
    weights = _weights(trainer)
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    trainer.strategy.teardown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL allows one rank per GPU: 2 ranks need 2 GPUs")
def test_ddp_over_nccl_matches_one_process(tmp_path):
    run_ranks(_nccl_job, str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["backend"], r["device"]) for r in ranks] == [("nccl", "cuda:0"), ("nccl", "cuda:1")]
    # one process on one GPU, the same global batch of 8 rows
    single = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "single", strategy="single", optim="sgd",
                                                   learning_rate=0.5), train_dataset=RaggedLM(64))
    single.train()
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # fp32; the GPU picks kernels per batch shape (4 rows vs 8) and NCCL its own summation order: ~1e-6
    # measured elsewhere, while a wrong loss normalisation is off by more than 1e-2. SGD: the weight error
    # bounds the gradient error.
    np.testing.assert_allclose(ranks[0]["losses"], losses_of(single), rtol=1e-4)
    ddp_weights, reference = torch.load(tmp_path / "weights.pt"), _weights(single)
    assert max((ddp_weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-4
    assert losses_of(single)[-1] < losses_of(single)[0]
