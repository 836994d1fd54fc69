"""Tensor parallelism from the model's own HF plan, composed with FSDP2 (tp x dp_shard) and with replicas
(tp x dp_replicate), on 4 gloo ranks against one process: two decoder families (Llama with GQA and tied
embeddings; Qwen2 with q/k/v biases and an untied head), AdamW with active gradient clipping (a global norm
over tensor-parallel shards and whole tensors), per-step losses and final weights within 1e-5, also with a
LoRA adapter on every projection and the chunked loss (its exported adapter equals the one-process run's). A checkpoint
taken under tp2 x dp_shard2 resumes under HSDP 2x2 and in one process; layouts and models tensor
parallelism cannot serve are refused before training, naming the value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import VOCAB, SEQ, RaggedLM, losses_of, run_ranks, tiny_llama
from scaletrain import Trainer, TrainingArguments

STEPS, ROWS, EVAL_ROWS = 4, 32, 10
PER_RANK, ACCUMULATION = 4, 2  # 2 data-parallel replicas x 4 rows x 2 micro-batches = 16 rows a step


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


# LoRA on every projection; its gradients are smaller, so a tighter clip keeps clipping active
LORA = {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}, "max_grad_norm": 0.1, "learning_rate": 1e-2,
        "chunked_loss": True}  # and the chunked loss, which applies the (whole) head inside the loss


def _args(out, per_device: int, accumulation: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                max_steps=STEPS, learning_rate=1e-3, optim="adamw_torch", max_grad_norm=0.5, logging_steps=1,
                save_steps=2, disable_tqdm=True, report_to="none", seed=0, ddp_timeout=300)
    return TrainingArguments(**{**base, **kw})


def _run(out: str, family: str, strategy: str, layout: dict, resume: str = None, **kw) -> dict:
    trainer = Trainer(model=MODELS[family](), args=_args(out, PER_RANK, ACCUMULATION, strategy=strategy,
                                                         parallelism_config=layout, **kw),
                      train_dataset=RaggedLM(ROWS))
    trainer.train(resume_from_checkpoint=resume)
    weights = dict(trainer.strategy.full_model_tensors(trainer.model_wrapped))
    evaluated = trainer.predict(RaggedLM(EVAL_ROWS, seed=4))  # each tp group evaluates one shard of rows
    return {"eval_loss": evaluated.metrics["test_loss"], "eval_rows": evaluated.predictions.shape[0],
            "losses": losses_of(trainer), "norms": [e["grad_norm"] for e in trainer.state.log_history
                                                    if "grad_norm" in e],
            "weights": weights, "describe": trainer.strategy.describe()}


def _layouts_job(rank: int, out: str) -> None:
    runs = {
        "llama fsdp tp2 x dp_shard2": _run(f"{out}/fsdp-tp", "llama", "fsdp", {"tp_size": 2, "dp_shard_size": 2}),
        "llama ddp tp2 x dp_replicate2": _run(f"{out}/ddp-tp", "llama", "ddp",
                                              {"tp_size": 2, "dp_replicate_size": 2}),
        "qwen2 fsdp tp2 x dp_shard2": _run(f"{out}/qwen", "qwen2", "fsdp", {"tp_size": 2, "dp_shard_size": 2}),
        # the tp2 x dp_shard2 checkpoint, resumed as HSDP 2x2: 4 data-parallel ranks, accumulation 1
        "llama resumed as hsdp 2x2": _run(f"{out}/hsdp", "llama", "fsdp", {"dp_replicate_size": 2,
                                                                           "dp_shard_size": 2},
                                          resume=f"{out}/fsdp-tp/checkpoint-2"),
        "llama lora fsdp tp2 x dp_shard2": _run(f"{out}/lora-fsdp", "llama", "fsdp", {"tp_size": 2, "dp_shard_size": 2},
                                                **LORA),
        "llama lora ddp tp2 x dp_replicate2": _run(f"{out}/lora-ddp", "llama", "ddp",
                                                   {"tp_size": 2, "dp_replicate_size": 2}, **LORA),
    }
    if rank == 0:
        torch.save(runs, Path(out, "runs.pt"))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    run_ranks(_layouts_job, str(out), world_size=4, timeout=600)
    return out, torch.load(out / "runs.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Each family (and Llama with LoRA) in one process with the same global batch (16 rows a step)."""
    runs = {}
    for name, family, extra in (("llama", "llama", {}), ("qwen2", "qwen2", {}), ("llama lora", "llama", LORA)):
        trainer = Trainer(model=MODELS[family](), args=_args(tmp_path_factory.mktemp(family), PER_RANK,
                                                             2 * ACCUMULATION, strategy="single", **extra),
                          train_dataset=RaggedLM(ROWS))
        trainer.train()
        runs[name] = trainer
    return runs


def _close(run: dict, reference: Trainer) -> None:
    _trained_alike(run, reference)
    assert run["eval_rows"] == EVAL_ROWS  # every row once: the tp ranks' copies are not gathered twice
    evaluated = reference.predict(RaggedLM(EVAL_ROWS, seed=4)).metrics["test_loss"]
    assert run["eval_loss"] == pytest.approx(evaluated, abs=1e-5)


def _trained_alike(run: dict, reference: Trainer) -> None:
    assert len(run["losses"]) == STEPS
    torch.testing.assert_close(run["losses"], losses_of(reference), rtol=0, atol=1e-5)
    norms = [e["grad_norm"] for e in reference.state.log_history if "grad_norm" in e]
    assert max(norms) > reference.args.max_grad_norm  # clipping acted: the global norm over shards must be right
    torch.testing.assert_close(run["norms"], norms, rtol=1e-5, atol=0)
    for name, value in reference.model.state_dict().items():
        if name in run["weights"]:  # a tied head is saved once
            torch.testing.assert_close(run["weights"][name], value, rtol=0, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name,family", [("llama fsdp tp2 x dp_shard2", "llama"),
                                         ("llama ddp tp2 x dp_replicate2", "llama"),
                                         ("qwen2 fsdp tp2 x dp_shard2", "qwen2"),
                                         ("llama lora fsdp tp2 x dp_shard2", "llama lora"),
                                         ("llama lora ddp tp2 x dp_replicate2", "llama lora")])
def test_tensor_parallel_layouts_match_one_process(layouts, one_process, name, family):
    _, runs = layouts
    _close(runs[name], one_process[family])
    assert "2 tp" in runs[name]["describe"]


def test_a_tensor_parallel_checkpoint_resumes_as_hsdp_and_in_one_process(layouts, one_process, tmp_path):
    out, runs = layouts
    manifest = json.loads((out / "fsdp-tp" / "checkpoint-2" / "manifest.json").read_text())
    assert manifest["layout"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "sp": 1, "tp": 2}
    _close(runs["llama resumed as hsdp 2x2"], one_process["llama"])
    single = Trainer(model=tiny_llama(seed=5), args=_args(tmp_path, PER_RANK, 2 * ACCUMULATION, strategy="single"),
                     train_dataset=RaggedLM(ROWS))
    single.train(resume_from_checkpoint=str(out / "fsdp-tp" / "checkpoint-2"))
    torch.testing.assert_close(losses_of(single), losses_of(one_process["llama"]), rtol=0, atol=1e-5)
    # and its HF folder opens with from_pretrained, whole
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out / "fsdp-tp" / "checkpoint-4"))
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, one_process["llama"].model.state_dict()[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("folder", ["lora-fsdp", "lora-ddp"])
def test_a_lora_adapter_trained_under_tensor_parallelism_exports_whole(layouts, one_process, folder, tmp_path):
    """The adapter's split factors (lora_B of column-wise layers, lora_A of row-wise ones) come back whole:
    the same adapter_model.safetensors as the one-process run's."""
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import export_checkpoint

    out, _ = layouts
    exported = load_file(str(export_checkpoint(out / folder / f"checkpoint-{STEPS}", tmp_path / "tp") /
                             "adapter_model.safetensors"))
    reference = one_process["llama lora"]
    reference.save_model(str(tmp_path / "one"))
    expected = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert exported.keys() == expected.keys() and len(expected) == 28  # A and B of 7 projections x 2 layers
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("layout,config,message", [
    ({"tp_size": 2}, {"num_key_value_heads": 1}, "does not divide the model's num_key_value_heads=1"),
    ({"tp_size": 4}, {}, "tp_size=4 does not divide the model's num_key_value_heads=2"),
])
def test_a_model_tensor_parallelism_cannot_split_is_refused(layout, config, message):
    from scaletrain.parallel.tensor_parallel import tensor_parallel_plan

    with pytest.raises(ValueError, match=message):
        tensor_parallel_plan(tiny_llama(**config), layout["tp_size"])


def test_dora_under_tensor_parallelism_is_refused_naming_the_layer():
    from peft import LoraConfig, get_peft_model

    from scaletrain.parallel.tensor_parallel import tensor_parallel_plan

    adapted = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match=r"tp_size=2 with DoRA \(model.layers.0.self_attn.q_proj\)"):
        tensor_parallel_plan(adapted, 2)


def test_a_model_without_a_plan_is_refused_naming_the_fix():
    from helpers import tiny_gpt2
    from scaletrain.parallel.tensor_parallel import tensor_parallel_plan

    with pytest.raises(ValueError, match="GPT2LMHeadModel has no tensor-parallel plan"):
        tensor_parallel_plan(tiny_gpt2(), 2)


def test_deepspeed_with_tensor_parallelism_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="tp_size=2 with strategy 'zero2'"):
        TrainingArguments(output_dir=str(tmp_path), strategy="zero2", parallelism_config={"tp_size": 2})


def test_the_cli_refuses_a_model_without_a_plan_before_any_process_group(tmp_path, monkeypatch, capsys):
    from scaletrain.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    # the tiny recipe's model is a BERT classifier: transformers ships no plan for it
    assert main(["train", "tiny-test", "--output_dir", str(tmp_path / "out"), "--strategy", "fsdp",
                 "--parallelism_config", '{"tp_size": 2, "dp_shard_size": 2}']) == 2
    assert "BertForSequenceClassification has no tensor-parallel plan" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def _three_dimensional_job(rank: int, out: str) -> None:
    trainer = Trainer(model=tiny_llama(), args=_args(out, PER_RANK, 1, strategy="fsdp", parallelism_config={
        "dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 2}), train_dataset=RaggedLM(ROWS))
    trainer.train()
    weights = dict(trainer.strategy.full_model_tensors(trainer.model_wrapped))
    if rank == 0:
        torch.save({"losses": losses_of(trainer), "weights": weights, "describe": trainer.strategy.describe(),
                    "norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]},
                   Path(out, "3d.pt"))


@pytest.mark.slow
def test_hsdp_times_tensor_parallelism_on_8_ranks_matches_one_process(one_process, tmp_path):
    """3-D: 2 replicas x 2 shards x 2 tp ranks; 4 data-parallel ranks x 4 rows = the one-process 16 rows."""
    run_ranks(_three_dimensional_job, str(tmp_path), world_size=8, timeout=600)
    run = torch.load(tmp_path / "3d.pt", weights_only=False)
    assert "2 dp_replicate x 2 dp_shard x 2 tp" in run["describe"]
    _trained_alike(run, one_process["llama"])
