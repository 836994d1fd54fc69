"""torch_compile (and fsdp_prefetch, FSDP2's other throughput knob) against eager on the same run: per-step
losses and final weights within fp32 noise, in one
process (inductor's C++ backend) and on 2 ranks under ddp (whole model) and fsdp (per block), with
activation checkpointing; refused under DeepSpeed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_ranks, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments

SEQ = 16


class FixedLength(torch.utils.data.Dataset):
    """One row length: a compiled graph serves every step (ragged rows would only add recompiles)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(1, 64, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def _train(out: str, **kw) -> Trainer:
    # SGD: Adam would turn float-order noise in near-zero gradients into lr-sized weight differences
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=0.5, optim="sgd", save_strategy="no", disable_tqdm=True,
                             report_to="none", seed=0, **kw)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=FixedLength())
    trainer.train()
    return trainer


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _compare(eager: Trainer, compiled: Trainer) -> None:
    assert len(_losses(compiled)) == 4
    torch.testing.assert_close(_losses(compiled), _losses(eager), rtol=1e-5, atol=0)
    ours = compiled.strategy.full_model_state_dict(compiled.model_wrapped)
    reference = eager.strategy.full_model_state_dict(eager.model_wrapped)
    if compiled.strategy.is_main:
        assert set(ours) == set(reference)  # in-place compile: the eager model's parameter names
        for name, value in reference.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_inductor_compiled_training_matches_eager_in_one_process(tmp_path):
    eager = _train(str(tmp_path / "eager"))
    compiled = _train(str(tmp_path / "compiled"), torch_compile=True)
    assert compiled.args.torch_compile_backend == "inductor"  # HF's default
    assert compiled.middleware.describe() == "torch.compile (inductor)"
    _compare(eager, compiled)


def _ranks_job(rank: int, out: str, strategy: str) -> None:
    extra = {"activation_checkpointing": True}
    eager = _train(f"{out}/eager", strategy=strategy, **extra)
    compiled = _train(f"{out}/compiled", strategy=strategy, torch_compile_backend="aot_eager", **extra)
    _compare(eager, compiled)
    compiles = compiled.middleware.items[-1].compiled
    Path(out, f"rank{rank}.json").write_text(json.dumps({"compiled_modules": compiles}))
    compiled.strategy.teardown()


@pytest.mark.parametrize("strategy, modules", [("ddp", 1), ("fsdp", 2)])  # the model, or its 2 blocks
def test_compiled_training_matches_eager_on_two_ranks(tmp_path, strategy, modules):
    run_ranks(_ranks_job, str(tmp_path), strategy, timeout=400)
    assert json.loads((tmp_path / "rank0.json").read_text())["compiled_modules"] == modules


def test_compile_options_follow_hf_and_deepspeed_is_refused(tmp_path):
    assert TrainingArguments(output_dir=str(tmp_path), torch_compile_mode="max-autotune").torch_compile
    with pytest.raises(ValueError, match="torch_compile_backend='nope' is not a torch.compile backend"):
        TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="nope")
    with pytest.raises(NotSupportedError, match="torch_compile with strategy 'zero2'"):
        TrainingArguments(output_dir=str(tmp_path), torch_compile=True, strategy="zero2")


def test_compile_mode_and_backend_reach_torch_compile(tmp_path, monkeypatch):
    """What Module.compile is called with (compiling is lazy: nothing is compiled here); the numerics of a
    compiled run are the tests above."""
    calls, real = [], torch.nn.Module.compile

    def compile_spy(module, *args, **kwargs):
        calls.append((type(module).__name__, args, kwargs))
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_spy)
    for options in ({"torch_compile_mode": "max-autotune-no-cudagraphs"}, {"torch_compile_backend": "aot_eager"}):
        args = TrainingArguments(output_dir=str(tmp_path), strategy="single", report_to="none", **options)
        Trainer(model=tiny_llama(), args=args, train_dataset=FixedLength())._setup_model()
    # either one implies torch_compile (HF's rule); the default backend is inductor, the default mode None
    assert calls == [("LlamaForCausalLM", (), {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}),
                     ("LlamaForCausalLM", (), {"backend": "aot_eager", "mode": None})]


def _prefetch_job(rank: int, out: str) -> None:
    plain = _train(f"{out}/plain", strategy="fsdp")
    ahead = _train(f"{out}/ahead", strategy="fsdp", fsdp_prefetch=1)
    assert _losses(ahead) == _losses(plain)  # prefetching reorders communication, not arithmetic
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    blocks = [m for m in ahead.model_wrapped.modules() if isinstance(m, LlamaDecoderLayer)]
    forward = [len(b._get_fsdp_state()._states_to_forward_prefetch) for b in blocks]
    backward = [len(b._get_fsdp_state()._states_to_backward_prefetch) for b in blocks]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"forward": forward, "backward": backward}))
    ahead.strategy.teardown()


def test_fsdp_prefetch_gathers_the_neighbouring_blocks_ahead_with_the_same_losses(tmp_path):
    run_ranks(_prefetch_job, str(tmp_path), timeout=300)
    # 2 blocks: the first prefetches the second in forward, the second the first in backward
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"forward": [1, 0], "backward": [0, 1]}
