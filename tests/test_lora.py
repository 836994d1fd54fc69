"""LoRA (peft) as a model transform: gradients against an independent
reference, frozen base, trainable count, adapter-only checkpoints with exact
resume, and the single-process loss curve reproduced on 2 ranks under ddp
(also with activation checkpointing), fsdp and zero2."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.middleware import LoRA
from scaletrain.middleware.lora import lora_settings

LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
STEPS = 6


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1,
                learning_rate=1e-2, disable_tqdm=True, save_strategy="no", optim="adamw_torch", seed=0,
                ddp_timeout=120, lora=LORA)
    return TrainingArguments(**{**base, **kw})


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    rows = [RaggedLM(n)[i] for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class _CPU:
    device = torch.device("cpu")


def test_lora_gradients_equal_the_chain_rule_through_the_merged_model():
    """The reference never runs peft's LoRA layers: it differentiates the plain
    model with merged weights W' = W + s·B·A and applies the chain rule,
    dL/dB = s·dL/dW'·Aᵀ and dL/dA = s·Bᵀ·dL/dW'."""
    adapted = LoRA(lora_settings(LORA)).transform_model(tiny_llama(), _CPU)
    torch.manual_seed(3)
    with torch.no_grad():  # B starts at zero, which would make dL/dA vanish
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    merged = copy.deepcopy(adapted).merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(True)
    batch = _batch()
    loss = adapted(**batch).loss
    loss.backward()
    reference_loss = merged(**batch).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)

    checked = 0
    merged_modules = dict(merged.named_modules())
    for name, module in adapted.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        scale = module.scaling["default"]
        grad_w = merged_modules[name].weight.grad
        # fp32; the two sides sum the same products in another order. Measured ~1e-7.
        torch.testing.assert_close(b.grad, scale * grad_w @ a.detach().T, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.grad, scale * b.detach().T @ grad_w, rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    # the base is frozen: no gradient reaches it
    assert all(p.grad is None for n, p in adapted.named_parameters() if "lora_" not in n)


def test_trainer_trains_only_the_adapters_and_resumes_exactly_from_adapter_checkpoints(tmp_path):
    base = tiny_llama()
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    first = Trainer(model=base, args=_args(tmp_path, save_strategy="steps", save_steps=3), train_dataset=RaggedLM(64))
    first.train()
    trainable, total = first.model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in first.optimizer.param_groups[0]["params"] +
                            (first.optimizer.param_groups[1]["params"] if len(first.optimizer.param_groups) > 1 else []))
    assert 0 < trainable < total / 5
    for name, param in first.model.base_model.model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, frozen_before[key]), f"{name} changed"

    # the checkpoint holds the adapters and their optimizer state, not the base
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(tmp_path / "checkpoint-3" / "state")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]

    resumed = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=RaggedLM(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert losses_of(resumed)[3:] == losses_of(first)[3:]


def _job(rank: int, out: str, strategy: str) -> None:
    results = {}
    for name, extra in (("plain", {}), ("checkpointed", {"activation_checkpointing": True})):
        if name == "checkpointed" and strategy != "ddp":
            continue
        trainer = Trainer(model=tiny_llama(), args=_args(f"{out}/{name}", per_device_train_batch_size=4,
                                                         strategy=strategy, **extra),
                          train_dataset=RaggedLM(64))
        trainer.train()
        results[name] = losses_of(trainer)
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path_factory.mktemp("lora-single")),
                      train_dataset=RaggedLM(64))
    trainer.train()
    return losses_of(trainer)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_rank_lora_reproduces_the_single_process_loss_curve(strategy, tmp_path, single_losses):
    run_ranks(_job, str(tmp_path), strategy, timeout=300)
    got = json.loads((tmp_path / "losses.json").read_text())
    for name, losses in got.items():
        # fp32, same global batch; the contract suite's tolerance
        np.testing.assert_allclose(losses, single_losses, rtol=1e-5, err_msg=name)
