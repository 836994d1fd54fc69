"""float8 training (TrainingArguments.float8, torchao): on CPU torch's _scaled_mm runs the float8 matmuls,
so the numerics are checked here and the speed on a GPU (benchmarks/gpu.sh). Against the same run in fp32,
with plain SGD so that every weight's total update is the learning rate times its summed gradients (Adam would
normalise a wrongly scaled gradient away): every converted layer is a Float8Linear (the LM head stays a
Linear); each trained tensor's update points the way fp32's does (cosine > 0.95) at the same size (within 10%:
gradients pass the float8 backward matmuls, whose e5m2 gradients keep 2 mantissa bits); the first loss is
fp32's within 5e-4 and the others within 1e-2, but not equal (the matmuls did run in float8). The same holds
on 2 FSDP2 ranks whose weights are all-gathered in float8, and their saved model opens with transformers'
from_pretrained. Options float8 cannot serve are refused naming them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments

STEPS, ROWS = 5, 40
pytest.importorskip("torchao")


def _args(out: str, **kw) -> TrainingArguments:
    base = dict(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=STEPS,
                learning_rate=1.0, optim="sgd", logging_steps=1, save_strategy="no", seed=0,
                disable_tqdm=True, report_to="none", ddp_timeout=300)
    return TrainingArguments(**{**base, **kw})


def _train(out: str, **kw) -> Trainer:
    trainer = Trainer(model=tiny_llama(), args=_args(out, **kw), train_dataset=RaggedLM(ROWS))
    trainer.train()
    return trainer


def _fsdp_job(rank: int, out: str) -> None:
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    trainer = _train(f"{out}/run", strategy="fsdp", float8=True, per_device_train_batch_size=2)
    gathered_in_float8 = all(isinstance(p.to_local(), WeightWithDynamicFloat8CastTensor)
                             for name, p in trainer.model.named_parameters() if "proj" in name)
    weights = dict(trainer.strategy.full_model_tensors(trainer.model_wrapped))
    trainer.save_model(f"{out}/saved")
    if rank == 0:
        torch.save({"losses": losses_of(trainer), "gathered_in_float8": gathered_in_float8, "weights": weights},
                   Path(out, "run.pt"))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    trainer = _train(str(tmp_path_factory.mktemp("fp32")), strategy="single")
    return losses_of(trainer), trainer.model.state_dict()


def _follows_fp32(losses: list[float], weights: dict, fp32) -> None:
    fp32_losses, fp32_weights = fp32
    assert abs(losses[0] - fp32_losses[0]) < 5e-4  # the same weights: only the forward's float8 rounding differs
    torch.testing.assert_close(losses, fp32_losses, rtol=0, atol=1e-2)
    assert max(abs(a - b) for a, b in zip(losses, fp32_losses, strict=True)) > 1e-6  # the matmuls ran in float8
    initial = tiny_llama().state_dict()
    for name, start in initial.items():
        if name not in weights:  # the tied head is saved once
            continue
        ours, theirs = (weights[name] - start).flatten(), (fp32_weights[name] - start).flatten()
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.95, name
        assert ours.norm() / theirs.norm() == pytest.approx(1.0, abs=0.1), name


def test_float8_converts_the_projections_and_trains_close_to_fp32(fp32, tmp_path):
    from torchao.float8.float8_linear import Float8Linear

    trainer = _train(str(tmp_path), strategy="single", float8=True)
    converted = {name for name, m in trainer.model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    assert type(trainer.model.lm_head) is torch.nn.Linear
    _follows_fp32(losses_of(trainer), trainer.model.state_dict(), fp32)


def test_float8_under_fsdp2_gathers_weights_in_float8_and_saves_a_loadable_model(fp32, tmp_path):
    from transformers import AutoModelForCausalLM

    run_ranks(_fsdp_job, str(tmp_path), world_size=2, timeout=300)
    run = torch.load(tmp_path / "run.pt", weights_only=False)
    assert run["gathered_in_float8"]
    _follows_fp32(run["losses"], run["weights"], fp32)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(saved.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # a plain HF model again
    assert saved.model.layers[0].mlp.up_proj.weight.shape == (64, 32)


@pytest.mark.parametrize("overrides,named", [
    ({"lora": {"r": 4}}, "float8=True with lora"),
    ({"strategy": "zero2"}, "float8=True with strategy 'zero2'"),
    ({"fp16": True}, "float8=True with fp16"),
    ({"strategy": "fsdp", "parallelism_config": {"tp_size": 2, "dp_shard_size": 1}}, "float8=True with tp_size"),
])
def test_options_float8_cannot_serve_are_refused_naming_them(tmp_path, overrides, named):
    with pytest.raises(NotSupportedError, match=named):
        TrainingArguments(output_dir=str(tmp_path), float8=True, **overrides)
