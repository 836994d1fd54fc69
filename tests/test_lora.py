"""LoRA (peft) as a model transform: gradients against an independent
reference, frozen base, trainable count, adapter-only checkpoints with exact
resume, and the single-process loss curve reproduced on 2 ranks under ddp
(also with activation checkpointing), fsdp, zero2 and zero3, and QLoRA under
each of them (ZeRO-3 partitions the quantized base)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.middleware import LoRA
from scaletrain.middleware.lora import lora_settings

LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
QLORA = {"quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}}
STEPS = 6


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1,
                learning_rate=1e-2, disable_tqdm=True, save_strategy="no", optim="adamw_torch", seed=0,
                ddp_timeout=120, lora=LORA)
    return TrainingArguments(**{**base, **kw})


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    rows = [RaggedLM(n)[i] for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _single():
    """The single-device strategy the middleware transforms a model for."""
    from scaletrain.strategies import build_strategy

    return build_strategy(TrainingArguments(output_dir="unused", strategy="single"))


def test_lora_gradients_equal_the_chain_rule_through_the_merged_model():
    """The reference never runs peft's LoRA layers: it differentiates the plain
    model with merged weights W' = W + s·B·A and applies the chain rule,
    dL/dB = s·dL/dW'·Aᵀ and dL/dA = s·Bᵀ·dL/dW'."""
    adapted = LoRA(lora_settings(LORA)).transform_model(tiny_llama(), _single())
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
    assert trainable == sum(p.numel() for group in first.optimizer.param_groups for p in group["params"])
    assert 0 < trainable < total / 5
    for name, param in first.model.base_model.model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, frozen_before[key]), f"{name} changed"

    # the checkpoint holds the adapters (peft's file) and their optimizer state, not the base
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"), "pt") as saved:
        model_keys = list(saved.keys())
    assert not (tmp_path / "checkpoint-3" / "model.safetensors").exists()
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]
    optimizer_state = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    assert len(optimizer_state) == len(model_keys)  # moments for the adapters alone

    resumed = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=RaggedLM(64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert losses_of(resumed)[3:] == losses_of(first)[3:]


# ZeRO-3 keeps parameters under this many elements whole on every rank; at 0
# the tiny model's quantized weights are really partitioned, gathered for each
# forward and released again
PARTITION_ALL = {"deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}


def _quantized_share(model: torch.nn.Module) -> float:
    """Share of the packed 4-bit base weights this rank stores."""
    import bitsandbytes as bnb

    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    held = sum(w.ds_tensor.numel() if hasattr(w, "ds_tensor") else w.numel() for w in weights)
    return held / sum(getattr(w, "ds_numel", w.numel()) for w in weights)


def _job(rank: int, out: str, strategy: str) -> None:
    from transformers import LlamaForCausalLM

    from scaletrain.strategies import build_strategy

    base = Path(out, f"base-{rank}")  # the same weights on each rank, no barrier needed
    tiny_llama().save_pretrained(base)
    results = {}
    for name, extra in (("plain", {}), ("checkpointed", {"activation_checkpointing": True}), ("qlora", QLORA)):
        if name not in COMPOSED[strategy]:
            continue
        settings = {**extra, **PARTITION_ALL} if strategy == "zero3" else extra
        args = _args(f"{out}/{name}", per_device_train_batch_size=4, strategy=strategy, save_strategy="steps",
                     save_steps=STEPS, **settings)
        built = build_strategy(args)
        built.setup_environment()
        # through the strategy, as from_pretrained: ZeRO-3 partitions the base
        # while it is built, so quantization has to gather each layer first
        model = built.build_model(lambda: LlamaForCausalLM.from_pretrained(base),
                                  lambda: LlamaForCausalLM.from_pretrained(base))
        results.setdefault("partitioned_at_construction", any(hasattr(p, "ds_tensor") for p in model.parameters()))
        trainer = Trainer(model=model, args=args, train_dataset=RaggedLM(64), strategy=built)
        trainer.train()
        results[name] = losses_of(trainer)
        if name == "qlora":
            results["quantized_share"] = _quantized_share(trainer.strategy.unwrap(trainer.model_wrapped))
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    from scaletrain.checkpoint.export import export_checkpoint

    losses = {}
    for name, extra in (("plain", {}), ("qlora", QLORA)):
        out = tmp_path_factory.mktemp(f"single-{name}")
        trainer = Trainer(model=tiny_llama(), args=_args(out, save_strategy="steps", save_steps=STEPS, **extra),
                          train_dataset=RaggedLM(64))
        trainer.train()
        losses[name] = losses_of(trainer)
        losses[f"{name}-adapter"] = _adapter_weights(export_checkpoint(out / f"checkpoint-{STEPS}", out / "adapter"))
    losses["checkpointed"] = losses["plain"]
    return losses


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# what each 2-rank job runs
COMPOSED = {"ddp": {"plain", "checkpointed", "qlora"}, "fsdp": {"plain", "qlora"}, "zero2": {"plain", "qlora"},
            "zero3": {"plain", "qlora"}}


@pytest.mark.parametrize("strategy", list(COMPOSED))
def test_two_rank_lora_reproduces_the_single_process_loss_curve(strategy, tmp_path, single_losses):
    run_ranks(_job, str(tmp_path), strategy, timeout=300)
    got = json.loads((tmp_path / "losses.json").read_text())
    if "qlora" in COMPOSED[strategy]:
        # ZeRO-3 partitions the packed 4-bit weights like any parameter (their
        # quantization state stays whole on every rank); the others replicate
        # them (FSDP2 shards everything else around them)
        assert got.pop("quantized_share") == (0.5 if strategy == "zero3" else 1.0)
    assert got.pop("partitioned_at_construction") == (strategy == "zero3")
    assert set(got) == COMPOSED[strategy]
    for name, losses in got.items():
        # fp32 compute (4-bit storage is deterministic), same global batch: the contract suite's tolerance
        np.testing.assert_allclose(losses, single_losses[name], rtol=1e-5, err_msg=name)

    # the 2-rank checkpoint (DCP shards, or DeepSpeed's partitions) exports the
    # same adapter as the single-process run's; the contract suite's 5e-4
    from scaletrain.checkpoint.export import export_checkpoint

    for name in COMPOSED[strategy] - {"checkpointed"}:
        exported = _adapter_weights(export_checkpoint(tmp_path / name / f"checkpoint-{STEPS}", tmp_path / name / "out"))
        reference = single_losses[f"{name}-adapter"]
        assert exported.keys() == reference.keys() and len(exported) == 28, name
        assert max((exported[k] - reference[k]).abs().max().item() for k in exported) < 5e-4, name


def test_adapter_and_merged_exports_reproduce_the_adapted_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from scaletrain.checkpoint.export import export_checkpoint

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(base_dir),
                      args=_args(tmp_path / "run", save_strategy="steps", save_steps=STEPS),
                      train_dataset=RaggedLM(64))
    trainer.train()
    manifest = json.loads((tmp_path / "run" / f"checkpoint-{STEPS}" / "manifest.json").read_text())
    assert manifest["base_model"] == str(base_dir)
    batch = _batch()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits

    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS}"
    merged = export_checkpoint(checkpoint, tmp_path / "merged", merge=True)
    adapter = export_checkpoint(checkpoint, tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(**batch).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
        adapter_logits = adapted(**batch).logits
    # merging adds s·B·A into W once; the adapter model adds s·B·(A·x) per token
    torch.testing.assert_close(merged_logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter_logits, expected, rtol=0, atol=1e-6)
    assert (merged_logits - AutoModelForCausalLM.from_pretrained(base_dir).eval()(**batch).logits).abs().max() > 1e-3


def _qlora_model(compute_dtype: str = "float32"):
    from scaletrain.middleware import Quantization
    from scaletrain.middleware.quantization import quantization_settings

    model = tiny_llama()
    settings = quantization_settings({**QLORA["quantization"], "compute_dtype": compute_dtype})
    model = Quantization(settings).transform_model(model, _single())
    adapted = LoRA(lora_settings(LORA)).transform_model(model, _single())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return adapted


def _dequantized_reference_grads(adapted, batch) -> tuple[torch.Tensor, dict[str, tuple]]:
    """Loss and expected (dL/dA, dL/dB) per adapted layer, from a plain fp32
    model whose weights are the dequantized 4-bit weights plus s·B·A."""
    import bitsandbytes as bnb

    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, param in adapted.base_model.model.named_parameters():
            if "lora_" in name or "base_layer" in name:
                continue
            dict(reference.named_parameters())[name].copy_(param)
        for name, module in adapted.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                weight = module.base_layer.weight
                dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                modules[name].weight.copy_(dense + module.scaling["default"] * b @ a)
    loss = reference(**batch).loss
    loss.backward()
    expected = {}
    for name, module in adapted.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            grad_w, scale = modules[name].weight.grad, module.scaling["default"]
            expected[name] = (scale * b.T @ grad_w, scale * grad_w @ a.T)
    return loss.detach(), expected


def _check_qlora_grads(adapted, batch) -> None:
    adapted.zero_grad(set_to_none=True)
    loss = adapted(**batch).loss
    loss.backward()
    reference_loss, expected = _dequantized_reference_grads(adapted, batch)
    # fp32 compute: the 4-bit layer dequantizes and multiplies in fp32, so only
    # summation order differs. Measured ~1e-7 relative.
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
    for name, module in adapted.base_model.model.named_modules():
        if name in expected:
            grad_a, grad_b = expected[name]
            assert module.lora_A["default"].weight.grad is not None, f"{name}: no LoRA gradient"
            torch.testing.assert_close(module.lora_A["default"].weight.grad, grad_a, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(module.lora_B["default"].weight.grad, grad_b, rtol=1e-4, atol=1e-6)
    assert len(expected) == 14


def test_qlora_gradients_match_the_dequantized_model_also_after_an_eval_pass():
    import bitsandbytes as bnb

    adapted = _qlora_model()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in adapted.modules()) == 14
    batch = _batch()
    adapted.train()
    _check_qlora_grads(adapted, batch)
    adapted.eval()  # the CPU trap: an eval-mode no-grad forward repacks 4-bit weights on AVX512-BF16 CPUs
    with torch.no_grad():
        adapted(**batch)
    adapted.train()
    _check_qlora_grads(adapted, batch)


def test_qlora_8bit_trains_only_the_adapters(tmp_path):
    base = tiny_llama()
    trainer = Trainer(model=base, args=_args(tmp_path, quantization={"bits": 8}, max_steps=8),
                      train_dataset=RaggedLM(64))
    trainer.train()
    losses = losses_of(trainer)
    assert losses[-1] < losses[0]
    int8 = [n for n, p in trainer.model.named_parameters() if p.dtype == torch.int8]
    assert len(int8) == 14  # every linear layer of the base, stored as int8
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("kw, error, message", [
    ({"quantization": {"bits": 4}}, ValueError, "quantization is set without lora"),
    ({"quantization": {"bits": 4}, "lora": {}, "strategy": "fsdp", "fsdp_low_memory_init": True}, NotSupportedError,
     "Set fsdp_low_memory_init: false"),
    ({"quantization": {"bits": 3}, "lora": {}}, ValueError, "bits=3 must be 4 or 8"),
    ({"lora": {"rank": 8}}, ValueError, "unknown keys \\['rank'\\]"),
    ({"lora": {"r": 0}}, ValueError, "r=0 must be an integer >= 1"),
])
def test_lora_options_that_cannot_work_are_refused(kw, error, message):
    with pytest.raises(error, match=message):
        TrainingArguments(output_dir="unused", **kw)


def test_qlora_with_bf16_compute_stays_close_to_the_dequantized_model():
    """bf16 compute rounds activations and the dequantized weights to 8
    significant bits (2^-9 relative each); through 2 layers the adapter
    gradients keep their direction and size to within a percent. Measured: at
    most 6e-3 relative error (norm of the difference / norm), median 4e-3; the
    test allows 2e-2. A wrong or missing gradient (the CPU trap) is off by ~100%."""
    adapted = _qlora_model("bfloat16")
    batch = _batch()
    for phase in ("train", "after eval"):
        if phase == "after eval":
            adapted.eval()
            with torch.no_grad():
                adapted(**batch)
            adapted.train()
        adapted.zero_grad(set_to_none=True)
        adapted(**batch).loss.backward()
        _, expected = _dequantized_reference_grads(adapted, batch)
        worst = 0.0
        for name, module in adapted.base_model.model.named_modules():
            if name in expected:
                for got, want in ((module.lora_A["default"].weight.grad, expected[name][0]),
                                  (module.lora_B["default"].weight.grad, expected[name][1])):
                    assert got is not None, f"{name}: no LoRA gradient {phase}"
                    worst = max(worst, float((got - want).norm() / want.norm()))
        assert worst < 2e-2, f"{phase}: relative gradient error {worst}"
