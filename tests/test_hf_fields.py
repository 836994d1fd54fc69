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

from helpers import RaggedLM, losses_of, tiny_gpt2, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments


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


def test_per_device_eval_batch_size_batches_evaluation_as_hf_does(tmp_path):
    steps = {}

    class CountBatches(transformers.TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            steps[name] += 1

    rows = RaggedLM(10, seed=4)
    for name, trainer in pair(tmp_path, dict(per_device_eval_batch_size=3), eval_dataset=rows).items():
        assert [len(b["input_ids"]) for b in trainer.get_eval_dataloader()] == [3, 3, 3, 1], name
        steps[name] = 0
        trainer.add_callback(CountBatches())
        trainer.evaluate()
        assert steps[name] == 4, name  # ceil(10 / 3) forwards, the last one short
        assert trainer.predict(rows).predictions.shape[0] == 10, name


def test_remove_unused_columns_drops_what_the_model_does_not_take_as_hf_does(tmp_path):
    """A column forward() has no argument for (`idx`) reaches the collator only with remove_unused_columns=False,
    for a plain list of rows (HF drops it in a collator) and a datasets.Dataset (HF drops the column)."""
    import datasets

    rows = [{**row, "idx": i} for i, row in enumerate(RaggedLM(16).rows)]
    table = datasets.Dataset.from_list([{k: v.tolist() if torch.is_tensor(v) else v for k, v in r.items()}
                                        for r in rows])
    model_columns = ["attention_mask", "input_ids", "labels"]
    for data in (rows, table):
        for remove in (True, False):
            for name, trainer in pair(tmp_path / str(remove), dict(remove_unused_columns=remove), train=data).items():
                seen = []

                def collate(batch, seen=seen):
                    seen.append(sorted(batch[0]))
                    return transformers.default_data_collator([{k: r[k] for k in model_columns} for r in batch])

                trainer.data_collator = collate
                expected = model_columns if remove else sorted([*model_columns, "idx"])
                for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader(data)):
                    seen.clear()
                    next(iter(loader))
                    assert seen and all(keys == expected for keys in seen), (type(data).__name__, remove, name)


def test_seed_seeds_the_model_that_model_init_builds_as_hf_does(tmp_path):
    """HF seeds before calling model_init, so `seed` decides its random initial weights (unlike data_seed)."""
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2().config
    built = {}
    for seed in (3, 3, 4):
        for name, trainer_cls, args_cls, extra in (
                ("hf", transformers.Trainer, transformers.TrainingArguments, {"use_cpu": True}),
                ("ours", Trainer, TrainingArguments, {"strategy": "single"})):
            torch.manual_seed(1234)  # whatever the process's RNG holds before: the seed decides
            args = args_cls(output_dir=str(tmp_path / name), seed=seed, report_to="none", **extra)
            trainer = trainer_cls(model_init=lambda: GPT2LMHeadModel(config), args=args)
            built.setdefault((name, seed), []).append(trainer.model.state_dict())
    for seed in (3, 4):
        for ours, theirs in zip(built["ours", seed], built["hf", seed], strict=True):
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), seed
    first, again = built["ours", 3]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.wte.weight"], built["ours", 4][0]["transformer.wte.weight"])


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
    # nonfinite_loss='continue': HF's behaviour, training on past the NaN step, whose log this test is about
    windowed = NaNAtStep(model=tiny_llama(), args=TrainingArguments(
        logging_steps=4, logging_nan_inf_filter=nan_filter, nonfinite_loss="continue", **common),
        train_dataset=RaggedLM(32))
    windowed.train()
    logged, = losses_of(windowed)
    if nan_filter:  # the mean of the finite steps (HF instead substitutes a running mean for the bad step)
        np.testing.assert_allclose(logged, np.mean([step_losses[0]] + step_losses[2:]), rtol=1e-6)
    else:
        assert math.isnan(logged)


class VariableRows(torch.utils.data.Dataset):
    """Rows of 2..16 tokens, unpadded: padded per batch by `pad_rows`."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(7)
        self.rows = []
        for _ in range(n):
            ids = torch.randint(1, 64, (int(torch.randint(2, 17, (1,), generator=g)),), generator=g)
            self.rows.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def pad_rows(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([F.pad(r[key], (0, width - len(r[key])), value=value) for r in rows])
    mask = torch.stack([F.pad(torch.ones(len(r["input_ids"]), dtype=torch.long), (0, width - len(r["input_ids"])))
                        for r in rows])
    return {"input_ids": pad("input_ids", 0), "labels": pad("labels", -100), "attention_mask": mask}


def _sampler_order(dataset, strategy: str, rank: int = 0, world_size: int = 1, per_device: int = 4, **extra):
    from scaletrain.data.loaders import build_train_dataloader, training_lengths

    args = TrainingArguments(output_dir="unused", strategy="single", per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=2, train_sampling_strategy=strategy, seed=0, **extra)
    lengths = training_lengths(dataset, dataset, args, None) if strategy == "group_by_length" else None
    loader = build_train_dataloader(dataset, pad_rows, args, rank, world_size, torch.device("cpu"), lengths=lengths)
    return list(loader.sampler)


def test_group_by_length_groups_each_step_and_shards_like_one_process():
    # HF groups within mega-batches of up to 50 steps' rows, at least 4 mega-batches: 320 rows give 10 steps'
    dataset = VariableRows(320)
    lengths = [len(r["input_ids"]) for r in dataset.rows]
    spread = {}
    for strategy in ("random", "group_by_length"):
        order = _sampler_order(dataset, strategy)
        assert sorted(order) == list(range(320))  # every row once an epoch
        steps = [order[i:i + 8] for i in range(0, 320, 8)]  # 4 rows x 2 micro-batches per step
        spread[strategy] = np.mean([max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps])
    assert spread["group_by_length"] < spread["random"] / 4, spread  # measured 1.25 vs 11.35 tokens
    grouped = _sampler_order(dataset, "group_by_length")
    assert lengths[grouped[0]] == max(lengths)  # HF puts a longest row first (an OOM shows at once)
    # 2 ranks x 2 rows take the rows one process x 4 rows takes, in the same steps
    ranks = [_sampler_order(dataset, "group_by_length", rank, 2, per_device=2) for rank in (0, 1)]
    for step in range(0, 160, 2):
        assert sorted(ranks[0][step:step + 2] + ranks[1][step:step + 2]) == sorted(grouped[2 * step:2 * step + 4])
    assert _sampler_order(dataset, "sequential") == list(range(320))


def test_group_by_length_reads_the_length_column_hf_names():
    import datasets

    rows = VariableRows(320).rows
    # a length column that disagrees with the rows' real lengths: the grouping must follow the column
    fake = [(i * 7) % 320 for i in range(320)]
    dataset = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows], "n_tokens": fake})
    order = _sampler_order(dataset.with_format("torch"), "group_by_length", length_column_name="n_tokens")
    assert fake[order[0]] == max(fake)
    steps = [order[i:i + 8] for i in range(0, 320, 8)]
    assert np.mean([max(fake[i] for i in s) - min(fake[i] for i in s) for s in steps]) < 40  # random: ~250


def test_group_by_length_resumes_exactly_mid_epoch(tmp_path):
    def run(max_steps: int, resume: bool = False):
        args = TrainingArguments(output_dir=str(tmp_path), strategy="single", per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=max_steps, save_steps=2,
                                 learning_rate=1e-2, optim="adamw_torch", report_to="none", logging_steps=1,
                                 train_sampling_strategy="group_by_length", seed=0, disable_tqdm=True)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=VariableRows(160), data_collator=pad_rows)
        trainer.train(resume_from_checkpoint=f"{tmp_path}/checkpoint-2" if resume else None)
        return trainer

    whole = run(5)  # 20 steps an epoch: checkpoint-2 is mid-epoch
    resumed = run(5, resume=True)
    assert losses_of(resumed) == losses_of(whole)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_liger_kernels_are_refused_before_launch_where_they_cannot_run(tmp_path):
    """Liger's Triton kernels need a CUDA GPU; on this CPU machine use_liger_kernel stops at construction
    (HF would fail inside the first forward), and a liger_kernel_config without the flag is not ignored."""
    with pytest.raises(NotSupportedError, match="use_liger_kernel=True needs a CUDA GPU"):
        TrainingArguments(output_dir=str(tmp_path), use_liger_kernel=True, liger_kernel_config={"rope": True})
    with pytest.raises(NotSupportedError, match="liger_kernel_config=.* is read only with use_liger_kernel=True"):
        TrainingArguments(output_dir=str(tmp_path), liger_kernel_config='{"rope": true}')
