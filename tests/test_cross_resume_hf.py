"""A checkpoint moves between transformers.Trainer and scaletrain, in both directions, and training goes on
as it would have without the switch: the same per-step losses, learning rates and final weights as an
uninterrupted run of the other trainer. The checkpoint is taken mid-epoch (data position), the optimizer is
AdamW (its moments must carry over) and attention dropout is on (the RNG streams must carry over)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import RaggedLM, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.checkpoint import CheckpointError

# 32 rows in micro-batches of 4 with 2 accumulated: 4 optimizer steps an epoch; checkpoint-3 is mid-epoch
COMMON = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=3e-3,
              weight_decay=0.01, max_grad_norm=1.0, warmup_steps=1, optim="adamw_torch", logging_steps=1,
              save_strategy="steps", save_steps=3, seed=0, disable_tqdm=True, report_to="none")


def model():
    return tiny_llama(attention_dropout=0.2)


def hf_trainer(out) -> transformers.Trainer:
    return transformers.Trainer(model=model(), args=transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, **COMMON), train_dataset=RaggedLM(32))


def our_trainer(out) -> Trainer:
    return Trainer(model=model(), args=TrainingArguments(output_dir=str(out), strategy="single", **COMMON),
                   train_dataset=RaggedLM(32))


def per_step(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    # each built right before it trains: HF seeds the RNG in its constructor only
    hf = hf_trainer(root / "hf")
    hf.train()
    ours = our_trainer(root / "ours")
    ours.train()
    return {"hf": hf, "ours": ours}


def assert_continues_as(resumed, reference) -> None:
    assert resumed.state.global_step == reference.state.global_step == 8
    # the history before the switch comes from the checkpoint, the rest from the resumed run
    torch.testing.assert_close(per_step(resumed, "loss"), per_step(reference, "loss"), rtol=0, atol=1e-5)
    assert per_step(resumed, "learning_rate") == pytest.approx(per_step(reference, "learning_rate"), rel=1e-9)
    theirs = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_the_two_trainers_agree_uninterrupted(uninterrupted):
    """The premise of the switch: same data order, dropout streams, schedule and updates."""
    assert_continues_as(uninterrupted["ours"], uninterrupted["hf"])
    start = model().state_dict()
    moved = max((uninterrupted["hf"].model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-2


def test_an_hf_trainer_checkpoint_resumes_in_scaletrain(uninterrupted, tmp_path):
    checkpoint = uninterrupted["hf"].args.output_dir + "/checkpoint-3"
    assert not (tmp_path / "manifest.json").exists()
    resumed = our_trainer(tmp_path / "ours")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert_continues_as(resumed, uninterrupted["hf"])
    # and what it writes from then on is a scaletrain checkpoint
    assert json.loads((tmp_path / "ours" / "checkpoint-6" / "manifest.json").read_text())["step"] == 6


def test_a_scaletrain_checkpoint_resumes_in_the_hf_trainer(uninterrupted, tmp_path):
    checkpoint = uninterrupted["ours"].args.output_dir + "/checkpoint-3"
    resumed = hf_trainer(tmp_path / "hf")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert_continues_as(resumed, uninterrupted["ours"])


def test_resume_true_finds_the_hf_trainers_newest_checkpoint(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted["hf"].args.output_dir + "/checkpoint-3", tmp_path / "checkpoint-3")
    resumed = our_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert_continues_as(resumed, uninterrupted["hf"])


def test_an_hf_checkpoint_of_another_model_is_refused_naming_the_weights(uninterrupted, tmp_path):
    checkpoint = uninterrupted["hf"].args.output_dir + "/checkpoint-3"
    other = Trainer(model=tiny_llama(num_hidden_layers=3), args=TrainingArguments(
        output_dir=str(tmp_path), strategy="single", **COMMON), train_dataset=RaggedLM(32))
    with pytest.raises(CheckpointError, match=r"do not fit this model: missing \['model.layers.2"):
        other.train(resume_from_checkpoint=checkpoint)


def test_an_hf_checkpoint_of_another_optimizer_grouping_is_refused(uninterrupted, tmp_path):
    checkpoint = uninterrupted["hf"].args.output_dir + "/checkpoint-3"
    frozen = model()
    frozen.model.norm.weight.requires_grad_(False)  # one trainable parameter fewer than the checkpoint's
    other = Trainer(model=frozen, args=TrainingArguments(output_dir=str(tmp_path), strategy="single", **COMMON),
                    train_dataset=RaggedLM(32))
    with pytest.raises(CheckpointError, match="parameter groups"):
        other.train(resume_from_checkpoint=checkpoint)


def _ddp_switch_job(rank: int, out: str) -> None:
    """Both trainers uninterrupted on 2 DDP ranks, then each resumed from the other's mid-epoch checkpoint."""
    args = dict(COMMON, num_train_epochs=3)  # a global batch of 16 over 32 rows: 2 steps an epoch

    def hf(folder):
        return transformers.Trainer(model=model(), args=transformers.TrainingArguments(
            output_dir=folder, use_cpu=True, ddp_backend="gloo", **args), train_dataset=RaggedLM(32))

    def ours(folder):
        return Trainer(model=model(), args=TrainingArguments(output_dir=folder, strategy="ddp", **args),
                       train_dataset=RaggedLM(32))

    runs = (("hf", hf, None), ("ours", ours, None), ("ours-from-hf", ours, f"{out}/hf/checkpoint-3"),
            ("hf-from-ours", hf, f"{out}/ours/checkpoint-3"))
    for name, make, resume in runs:
        trainer = make(f"{out}/{name}")  # built right before it trains: HF seeds in its constructor only
        trainer.train(resume_from_checkpoint=resume)
        if rank == 0:
            unwrapped = getattr(trainer.model, "module", trainer.model)
            torch.save({"losses": per_step(trainer, "loss"), "rates": per_step(trainer, "learning_rate"),
                        "weights": unwrapped.state_dict()}, f"{out}/{name}.pt")


def test_a_checkpoint_moves_between_the_trainers_under_ddp(tmp_path):
    """On 2 gloo ranks, with each rank's dropout stream and data shard carried over (rng_state_<rank>.pth)."""
    from helpers import run_ranks

    run_ranks(_ddp_switch_job, str(tmp_path), timeout=600)
    result = {name: torch.load(tmp_path / f"{name}.pt") for name in ("hf", "ours", "ours-from-hf", "hf-from-ours")}
    assert (tmp_path / "hf" / "checkpoint-3" / "rng_state_1.pth").is_file()
    assert (tmp_path / "ours" / "checkpoint-3" / "optimizer.pt").is_file()
    for resumed, reference in (("ours", "hf"), ("ours-from-hf", "hf"), ("hf-from-ours", "ours")):
        assert len(result[resumed]["losses"]) == 6
        torch.testing.assert_close(result[resumed]["losses"], result[reference]["losses"], rtol=0, atol=1e-5)
        assert result[resumed]["rates"] == pytest.approx(result[reference]["rates"], rel=1e-9)
        for name, value in result[resumed]["weights"].items():
            torch.testing.assert_close(value, result[reference]["weights"][name], rtol=0, atol=1e-6, msg=name)
