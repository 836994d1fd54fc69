"""TrainingArguments fields HF scripts set, each against transformers.Trainer on the same run or an
independent reference: the logging and evaluation schedule, Adam's hyperparameters, the data
loader's settings and order, label_names, and the NaN/inf filter of logged losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import RaggedLM, losses_of, tiny_llama
from scaletrain import Trainer, TrainingArguments


def pair(tmp_path, common: dict, model_fn=tiny_llama, train=None, eval_dataset=None, compute_metrics=None) -> dict:
    """{"hf": ..., "ours": ...}: both trainers on the same model, data and arguments."""
    trainers = {}
    for name, trainer_cls, args_cls, extra in (
            ("hf", transformers.Trainer, transformers.TrainingArguments, {"use_cpu": True}),
            ("ours", Trainer, TrainingArguments, {"strategy": "single"})):
        args = args_cls(output_dir=str(tmp_path / name), disable_tqdm=True, report_to="none", save_strategy="no",
                        seed=0, **common, **extra)
        trainers[name] = trainer_cls(model=model_fn(), args=args, train_dataset=train or RaggedLM(32),
                                     eval_dataset=eval_dataset, compute_metrics=compute_metrics)
    return trainers


def _accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def _events(trainer) -> list[tuple]:
    """(step, what) for every log entry: a training log, an evaluation (with or without metrics), the summary."""
    kinds = []
    for entry in trainer.state.log_history:
        kind = ("train" if "loss" in entry else "summary" if "train_loss" in entry else
                "eval+metrics" if "eval_accuracy" in entry else "eval")
        kinds.append((entry["step"], kind))
    return kinds


@pytest.mark.parametrize("schedule", [
    dict(logging_strategy="steps", logging_steps=3, logging_first_step=True, eval_strategy="steps", eval_steps=2,
         eval_delay=3, eval_on_start=True, prediction_loss_only=True),
    dict(logging_strategy="epoch", eval_strategy="epoch", prediction_loss_only=False),
])
def test_logging_and_evaluation_schedules_are_hfs(tmp_path, schedule):
    trainers = pair(tmp_path, dict(per_device_train_batch_size=4, num_train_epochs=2, learning_rate=0.1,
                                   optim="sgd", **schedule),
                    eval_dataset=RaggedLM(8, seed=4), compute_metrics=_accuracy)
    for trainer in trainers.values():
        trainer.train()
    assert _events(trainers["ours"]) == _events(trainers["hf"])
    assert len(_events(trainers["ours"])) >= 5


def test_adam_hyperparameters_reach_the_optimizer_as_in_the_hf_trainer(tmp_path):
    trainers = pair(tmp_path, dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=2,
                                   learning_rate=1e-2, optim="adamw_torch", adam_beta1=0.5, adam_beta2=0.9,
                                   adam_epsilon=1e-3))
    for trainer in trainers.values():
        trainer.train()
    group = trainers["ours"].optimizer.param_groups[0]
    assert group["betas"] == (0.5, 0.9) and group["eps"] == 1e-3
    start = tiny_llama().state_dict()
    hf, ours = trainers["hf"].model.state_dict(), trainers["ours"].model.state_dict()
    moved = max((hf[k] - start[k]).abs().max().item() for k in start)
    apart = max((hf[k] - ours[k]).abs().max().item() for k in start)
    default = pair(tmp_path / "default", dict(per_device_train_batch_size=8, gradient_accumulation_steps=4,
                                              num_train_epochs=2, learning_rate=1e-2, optim="adamw_torch"))["ours"]
    default.train()
    off_by_defaults = max((default.model.state_dict()[k] - ours[k]).abs().max().item() for k in start)
    # the same weights as HF's up to float noise that Adam's normalisation amplifies; Adam's defaults
    # would move them measurably elsewhere
    assert moved > 1e-2 and apart < 1e-2 * moved < off_by_defaults


def test_dataloader_fields_build_the_loader_hfs_trainer_builds(tmp_path):
    common = dict(per_device_train_batch_size=5, dataloader_drop_last=True, dataloader_num_workers=2,
                  dataloader_pin_memory=False, dataloader_persistent_workers=True, dataloader_prefetch_factor=3)
    loaders = {name: trainer.get_train_dataloader() for name, trainer in pair(tmp_path, common).items()}
    for attribute in ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor"):
        assert getattr(loaders["ours"], attribute) == getattr(loaders["hf"], attribute), attribute
    # HF's loader batches through a batch sampler: batch size and drop_last show in its length and batches
    assert len(loaders["ours"]) == len(loaders["hf"]) == 32 // 5  # the ragged last batch dropped
    assert [len(b["input_ids"]) for b in loaders["ours"]] == [len(b["input_ids"]) for b in loaders["hf"]] == [5] * 6
    in_process = pair(tmp_path / "in_process", {"per_device_train_batch_size": 5, "dataloader_drop_last": True})
    batches = [next(iter(loader))["input_ids"] for loader in
               (loaders["ours"], in_process["ours"].get_train_dataloader())]
    torch.testing.assert_close(batches[0], batches[1])  # two worker processes deliver the same batches


def test_data_seed_orders_the_data_and_seed_does_not(tmp_path):
    """HF's split: data_seed seeds the sampler alone; the order is a permutation seeded by data_seed + epoch."""
    rows = RaggedLM(32).rows
    first_batches = {}
    for seed, data_seed in ((0, 11), (5, 11), (0, 12)):
        args = TrainingArguments(output_dir=str(tmp_path / f"{seed}-{data_seed}"), strategy="single",
                                 per_device_train_batch_size=4, seed=seed, data_seed=data_seed, report_to="none")
        loader = Trainer(model=tiny_llama(), args=args, train_dataset=RaggedLM(32)).get_train_dataloader()
        first_batches[seed, data_seed] = next(iter(loader))["input_ids"]
    order = torch.randperm(32, generator=torch.Generator().manual_seed(11))[:4].tolist()
    torch.testing.assert_close(first_batches[0, 11], torch.stack([rows[i]["input_ids"] for i in order]))
    torch.testing.assert_close(first_batches[5, 11], first_batches[0, 11])
    assert not torch.equal(first_batches[0, 12], first_batches[0, 11])


class TargetLM(torch.nn.Module):
    """A model whose labels are called `target`: found only through label_names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64)

    def forward(self, input_ids, target=None, attention_mask=None):
        logits = self.head(self.embed(input_ids))
        loss = None if target is None else F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


class TargetRows(RaggedLM):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {"input_ids": row["input_ids"], "attention_mask": row["attention_mask"], "target": row["labels"]}


def test_label_names_find_the_labels_as_hf_does(tmp_path):
    trainers = pair(tmp_path, dict(label_names=["target"], per_device_eval_batch_size=16, per_device_train_batch_size=8,
                                   num_train_epochs=1, learning_rate=0.1, optim="sgd", remove_unused_columns=False),
                    model_fn=TargetLM, train=TargetRows(16), eval_dataset=TargetRows(16, seed=4),
                    compute_metrics=_accuracy)
    for trainer in trainers.values():
        trainer.train()
    outputs = {name: trainer.predict(TargetRows(16, seed=4)) for name, trainer in trainers.items()}
    np.testing.assert_array_equal(outputs["ours"].label_ids, outputs["hf"].label_ids)
    np.testing.assert_allclose(outputs["ours"].predictions, outputs["hf"].predictions, atol=1e-6, rtol=0)
    for key in ("test_loss", "test_accuracy"):
        np.testing.assert_allclose(outputs["ours"].metrics[key], outputs["hf"].metrics[key], rtol=1e-6)


class NaNAtStep(Trainer):
    """Reports a NaN loss for optimizer step 2 (the gradients stay finite)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step == 1 else loss


@pytest.mark.parametrize("nan_filter", [True, False])
def test_nan_inf_filter_leaves_non_finite_steps_out_of_the_logged_loss(tmp_path, nan_filter):
    common = dict(output_dir=str(tmp_path), strategy="single", per_device_train_batch_size=8, max_steps=4,
                  learning_rate=0.1, optim="sgd", report_to="none", save_strategy="no")
    per_step = Trainer(model=tiny_llama(), args=TrainingArguments(logging_steps=1, **common),
                       train_dataset=RaggedLM(32))
    per_step.train()
    step_losses = losses_of(per_step)
    windowed = NaNAtStep(model=tiny_llama(), args=TrainingArguments(logging_steps=4, logging_nan_inf_filter=nan_filter,
                                                                    **common), train_dataset=RaggedLM(32))
    windowed.train()
    logged, = losses_of(windowed)
    if nan_filter:  # the mean of the finite steps (HF instead substitutes a running mean for the bad step)
        np.testing.assert_allclose(logged, np.mean([step_losses[0]] + step_losses[2:]), rtol=1e-6)
    else:
        assert math.isnan(logged)
