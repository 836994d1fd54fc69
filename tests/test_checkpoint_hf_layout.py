"""checkpoint-N folders an HF user can open: `from_pretrained(output_dir/checkpoint-N)` (and peft's for a
LoRA run) loads the weights of that step, for every strategy, checked against an independent path (the
offline consolidation of the checkpoint's own state that `scaletrain export` uses, or the trained model
in the process). Sharded models are written one gathered tensor at a time, in shards with HF's index
when they exceed the shard size."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import RaggedLM, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from scaletrain.checkpoint.hf_weights import WEIGHTS_INDEX_NAME, write_hf_weights

STEPS = 2


def _args(out: str, strategy: str, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=out, strategy=strategy, per_device_train_batch_size=2, max_steps=STEPS,
                             learning_rate=1e-2, save_steps=STEPS, disable_tqdm=True, report_to="none", seed=0,
                             optim="adamw_torch", ddp_timeout=120, **kw)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(opened: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    mine = opened.state_dict()
    assert set(reference) <= set(mine)
    worst = max((mine[k] - reference[k]).abs().max().item() for k in reference)
    assert worst == 0.0, f"checkpoint weights differ from the reference by {worst}"


def test_a_single_process_checkpoint_opens_with_from_pretrained(tmp_path):
    trainer = Trainer(model=tiny_gpt2(), args=_args(str(tmp_path), "single"), train_dataset=RaggedLM(16))
    trainer.train()
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "training_args.bin").is_file()
    opened = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    _assert_same_weights(opened, _state(trainer.model))  # the model at step 2 is the trained model
    untrained = _state(tiny_gpt2())
    assert any(not torch.equal(untrained[k], v) for k, v in _state(opened).items())
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert args.max_steps == STEPS and args.strategy == "single"


def test_large_models_are_sharded_with_hf_index(tmp_path):
    model = tiny_gpt2()
    state = _state(model)
    tied = {"lm_head.weight"}  # tied to the input embedding, left out as save_pretrained leaves it
    model.config.save_pretrained(str(tmp_path))
    write_hf_weights(tmp_path, iter(state.items()), writes=True, skip=frozenset(tied), max_shard_bytes=40_000)
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(state) - tied
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for k, v in state.items()
                                                  if k not in tied)
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(str(tmp_path)), state)


def _sharded_job(rank: int, out: str) -> None:
    for strategy in ("fsdp", "zero3"):
        Trainer(model=tiny_gpt2(), args=_args(f"{out}/{strategy}", strategy),
                train_dataset=RaggedLM(16)).train()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_ranks(_sharded_job, str(out))
    return out


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_sharded_checkpoint_opens_with_from_pretrained(sharded_runs, strategy, tmp_path):
    from scaletrain.checkpoint.export import export_checkpoint

    checkpoint = sharded_runs / strategy / f"checkpoint-{STEPS}"
    opened = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    # the independent path: the checkpoint's own sharded state, consolidated offline in this process
    exported = export_checkpoint(checkpoint, tmp_path / "export")
    _assert_same_weights(opened, _state(AutoModelForCausalLM.from_pretrained(str(exported))))
    assert any(not torch.equal(v, _state(tiny_gpt2())[k]) for k, v in _state(opened).items())


def test_a_lora_checkpoint_opens_with_peft(tmp_path):
    from peft import PeftModel

    lora = {"r": 4, "alpha": 8, "target_modules": ["c_attn"], "dropout": 0.0}
    trainer = Trainer(model=tiny_gpt2(), args=_args(str(tmp_path), "single", lora=lora), train_dataset=RaggedLM(16))
    trainer.train()
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    opened = PeftModel.from_pretrained(tiny_gpt2(), str(checkpoint))
    batch = RaggedLM(4, seed=3)[0]
    ids = batch["input_ids"].unsqueeze(0)
    trainer.model.eval()
    with torch.no_grad():
        expected, got = trainer.model(input_ids=ids).logits, opened(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(tiny_gpt2()(input_ids=ids).logits, expected, atol=1e-4)  # the adapter trained
