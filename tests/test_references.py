"""scaletrain's single-process Trainer against references it does not share code with.

1. A plain PyTorch loop written here: SGD (GPT-2) and AdamW (Llama) with HF's
   decay groups (no decay on biases and normalisation weights), gradient
   clipping, warmup + linear decay, and gradient accumulation over ragged rows
   with the loss normalised by the step's target count. A bug shared by every
   strategy (loss weighting, decay groups, schedule, clipping) would show here
   and nowhere else. GPT-2 runs SGD because its attention key bias has an
   analytically zero gradient (softmax ignores a shift shared by all keys):
   Adam normalises the float noise there into full-size steps.
2. transformers.Trainer itself on the same script. HF shuffles with its own
   RNG, so each optimizer step takes the whole dataset (4 micro-batches of 8
   rows): every step's gradient is then the same whatever the order. SGD keeps
   float-order noise from being amplified as Adam's normalisation would.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import RaggedLM, losses_of, tiny_gpt2, tiny_llama
from scaletrain import Trainer, TrainingArguments

SEED, WARMUP, DECAY, CLIP = 3, 2, 0.1, 0.5
ROWS, MICRO, ACCUMULATION, EPOCHS = 40, 4, 3, 2
RUNS = {"gpt2-sgd": (tiny_gpt2, "sgd", 0.5), "llama-adamw": (tiny_llama, "adamw_torch", 3e-3)}


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def decay_groups(model: torch.nn.Module) -> list[dict]:
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((targets != -100).sum())


def plain_loop(make_model, optim: str, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    data = RaggedLM(ROWS)
    micro_per_epoch = ROWS // MICRO
    steps_per_epoch = -(-micro_per_epoch // ACCUMULATION)
    total_steps = steps_per_epoch * EPOCHS
    optimizer = (torch.optim.SGD(decay_groups(model), lr=lr) if optim == "sgd" else
                 torch.optim.AdamW(decay_groups(model), lr=lr, betas=(0.9, 0.999), eps=1e-8))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / WARMUP if s < WARMUP else max(0.0, (total_steps - s) / (total_steps - WARMUP)))
    losses = []
    for epoch in range(EPOCHS):
        # the data order scaletrain documents: a permutation seeded by seed + epoch
        order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        micro = [order[i:i + MICRO] for i in range(0, ROWS, MICRO)]
        for step in range(steps_per_epoch):
            group = micro[step * ACCUMULATION:(step + 1) * ACCUMULATION]
            batches = [{k: torch.stack([data[i][k] for i in rows]) for k in data[0]} for rows in group]
            targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            step_loss = 0.0
            for batch in batches:
                loss, _ = summed_token_loss(model, batch)
                (loss / targets).backward()
                step_loss += loss.item() / targets
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_single_process_trainer_matches_a_plain_pytorch_loop(run, tmp_path):
    make_model, optim, lr = RUNS[run]
    reference_losses, reference_weights = plain_loop(make_model, optim, lr)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUMULATION, num_train_epochs=EPOCHS, learning_rate=lr,
                             weight_decay=DECAY, max_grad_norm=CLIP, warmup_steps=WARMUP, lr_scheduler_type="linear",
                             optim=optim, logging_steps=1, save_strategy="no", seed=SEED, strategy="single",
                             disable_tqdm=True)
    trainer = Trainer(model=make_model(), args=args, train_dataset=RaggedLM(ROWS))
    trainer.train()
    assert len(losses_of(trainer)) == len(reference_losses) == 8  # 4 steps per epoch, the last of one micro-batch
    np.testing.assert_allclose(losses_of(trainer), reference_losses, rtol=1e-6)
    weights = trainer.model.state_dict()
    moved = max((reference_weights[k] - make_model().state_dict()[k]).abs().max().item() for k in weights)
    assert moved > 1e-3  # training moved the weights far beyond the tolerance below
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=0, atol=1e-6, msg=name)


def hf_run(tmp_path, common: dict, trainer_cls=transformers.Trainer, eval_dataset=None):
    """transformers' Trainer on tiny Llama and 32 ragged rows, trained."""
    trainer = trainer_cls(model=tiny_llama(), args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, **common), train_dataset=RaggedLM(32), eval_dataset=eval_dataset)
    trainer.train()
    return trainer


def our_run(tmp_path, common: dict, name: str = "ours", trainer_cls=Trainer, eval_dataset=None):
    """scaletrain's Trainer on the same model and data, trained in one process."""
    trainer = trainer_cls(model=tiny_llama(), args=TrainingArguments(
        output_dir=str(tmp_path / name), strategy="single", **common), train_dataset=RaggedLM(32),
        eval_dataset=eval_dataset)
    trainer.train()
    return trainer


def test_single_process_trainer_matches_the_hf_trainer(tmp_path):
    common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=4, learning_rate=0.5,
                  weight_decay=0.01, max_grad_norm=1.0, warmup_steps=1, lr_scheduler_type="linear", optim="sgd",
                  logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, per_device_eval_batch_size=32,
                  report_to="none")
    # tiny Llama: HF counts its shifted targets right (GPT-2's loss_type is None in transformers 5.24)
    hf = hf_run(tmp_path, common, eval_dataset=RaggedLM(16, seed=4))
    ours = our_run(tmp_path, common, eval_dataset=RaggedLM(16, seed=4))
    hf_losses = [e["loss"] for e in hf.state.log_history if "loss" in e]
    assert len(losses_of(ours)) == len(hf_losses) == 4
    np.testing.assert_allclose(losses_of(ours), hf_losses, rtol=0, atol=5.1e-5)  # HF rounds logged losses to 4 digits
    start = tiny_llama().state_dict()
    hf_weights, our_weights = hf.model.state_dict(), ours.model.state_dict()
    assert max((hf_weights[k] - start[k]).abs().max().item() for k in start) > 1e-2
    for name in start:
        torch.testing.assert_close(our_weights[name], hf_weights[name], rtol=0, atol=1e-6, msg=name)
    # one eval batch: HF's mean of batch means is then the mean over all targets, as ours is
    np.testing.assert_allclose(ours.evaluate()["eval_loss"], hf.evaluate()["eval_loss"], rtol=1e-6)


class SummedLossOverrides:
    """compute_loss and training_step as users override them for HF's Trainer: HF's exact signatures,
    the loss summed over the micro-batch's targets and divided by num_items_in_batch (the step's count)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        targets = inputs["labels"][:, 1:]
        logits = outputs.logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()


class HFTrainerWithOverrides(SummedLossOverrides, transformers.Trainer):
    pass


class TrainerWithOverrides(SummedLossOverrides, Trainer):
    pass


def test_hf_style_overrides_train_as_they_do_under_the_hf_trainer(tmp_path):
    common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=3, learning_rate=0.5,
                  max_grad_norm=1.0, optim="sgd", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                  report_to="none")
    hf = hf_run(tmp_path, common, HFTrainerWithOverrides)
    runs = {name: our_run(tmp_path, common, name, cls)
            for name, cls in (("overrides", TrainerWithOverrides), ("default", Trainer))}
    start, hf_weights = tiny_llama().state_dict(), hf.model.state_dict()
    assert max((hf_weights[k] - start[k]).abs().max().item() for k in start) > 1e-2
    for run in runs.values():  # the override is normalised once, as HF's is, and equals the default path
        weights = run.model.state_dict()
        for name in start:
            torch.testing.assert_close(weights[name], hf_weights[name], rtol=0, atol=1e-6, msg=name)
    hf_losses = [e["loss"] for e in hf.state.log_history if "loss" in e]
    np.testing.assert_allclose(losses_of(runs["overrides"]), hf_losses, rtol=0, atol=5.1e-5)


@pytest.mark.parametrize("schedule, kwargs", [
    # thresholds no loss can beat: every evaluation is a bad one, so the LR falls after each, on both trainers
    ("reduce_lr_on_plateau", {"patience": 0, "factor": 0.5, "threshold": 10.0}),
    ("greedy", {"patience": 0, "factor": 0.5, "threshold": 1e9, "min_lr": 0.0}),
])
def test_metric_schedules_step_on_the_eval_metric_as_in_the_hf_trainer(tmp_path, schedule, kwargs):
    common = dict(per_device_train_batch_size=8, num_train_epochs=1, learning_rate=0.1, optim="sgd",
                  logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="no", seed=0,
                  disable_tqdm=True, report_to="none", lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs)
    rates = {}
    for name, trainer_cls, args_cls, extra in (
            ("hf", transformers.Trainer, transformers.TrainingArguments, {"use_cpu": True}),
            ("ours", Trainer, TrainingArguments, {"strategy": "single"})):
        trainer = trainer_cls(model=tiny_llama(), args=args_cls(output_dir=str(tmp_path / name), **common, **extra),
                              train_dataset=RaggedLM(32), eval_dataset=RaggedLM(8, seed=4))
        trainer.train()
        rates[name] = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert rates["ours"] == rates["hf"]
    assert rates["ours"][-1] < rates["ours"][0]  # the schedule moved the optimizer's learning rate


OPTIMIZER_CASES = {
    "adagrad": {}, "rmsprop": {}, "lion_32bit": {},
    "sgd": {"optim_args": "momentum=0.9,nesterov=true", "learning_rate": 0.5},  # HF's optim_args, read the same way
    "galore_adamw": {"optim_target_modules": ["self_attn", "mlp"], "optim_args": "rank=4,update_proj_gap=2"},
    # evaluated every step: each evaluation must see the schedule-free average, and training go on from the
    # training point (optimizer.eval()/train() as HF switches them)
    "schedule_free_adamw": {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 32},
}


@pytest.mark.parametrize("optim", sorted(OPTIMIZER_CASES))
def test_other_optimizers_match_the_hf_trainer(tmp_path, optim):
    """HF's own name -> optimizer mapping, so the same weights as the HF Trainer's on the same run."""
    common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=2,
                  learning_rate=1e-2, weight_decay=0.01, optim=optim, logging_steps=1, save_strategy="no", seed=0,
                  disable_tqdm=True, report_to="none")
    common.update(OPTIMIZER_CASES[optim])
    evaluation = RaggedLM(16, seed=4) if "eval_strategy" in common else None
    hf, ours = hf_run(tmp_path, common, eval_dataset=evaluation), our_run(tmp_path, common, eval_dataset=evaluation)
    hf_optimizer = hf.optimizer.optimizer if hasattr(hf.optimizer, "optimizer") else hf.optimizer
    assert type(ours.optimizer) is type(hf_optimizer)
    assert ours.optimizer.defaults == {k: hf_optimizer.defaults[k] for k in ours.optimizer.defaults}
    if optim == "sgd":
        assert (ours.optimizer.defaults["momentum"], ours.optimizer.defaults["nesterov"]) == (0.9, True)
    if optim.startswith("schedule_free"):
        hf_eval = [e["eval_loss"] for e in hf.state.log_history if "eval_loss" in e]
        our_eval = [e["eval_loss"] for e in ours.state.log_history if "eval_loss" in e]
        np.testing.assert_allclose(our_eval, hf_eval, rtol=1e-6)
        hf_optimizer.eval()  # HF leaves the model at the training point; scaletrain at the evaluation point
    start, hf_weights, our_weights = tiny_llama().state_dict(), hf.model.state_dict(), ours.model.state_dict()
    moved = max((hf_weights[k] - start[k]).abs().max().item() for k in start)
    apart = max((hf_weights[k] - our_weights[k]).abs().max().item() for k in start)
    # adaptive optimizers divide by the gradients' own scale, which turns ~1e-7 float-order noise into
    # ~1e-5 here (8e-6 measured for rmsprop at lr 1e-3); a wrong learning rate or rule differs by about `moved`
    assert moved > 1e-2 and apart < 1e-2 * moved


def test_label_smoothing_matches_the_hf_trainer(tmp_path):
    common = dict(per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=2, learning_rate=0.5,
                  optim="sgd", label_smoothing_factor=0.1, logging_steps=1, save_strategy="no", seed=0,
                  disable_tqdm=True, per_device_eval_batch_size=32, report_to="none")
    hf = hf_run(tmp_path, common, eval_dataset=RaggedLM(16, seed=4))
    ours = our_run(tmp_path, common, eval_dataset=RaggedLM(16, seed=4))
    plain = our_run(tmp_path, {**common, "label_smoothing_factor": 0.0}, "plain")
    start, hf_weights, our_weights = tiny_llama().state_dict(), hf.model.state_dict(), ours.model.state_dict()
    assert max((our_weights[k] - plain.model.state_dict()[k]).abs().max().item() for k in start) > 1e-4
    for name in start:
        torch.testing.assert_close(our_weights[name], hf_weights[name], rtol=0, atol=1e-6, msg=name)
    np.testing.assert_allclose(ours.evaluate()["eval_loss"], hf.evaluate()["eval_loss"], rtol=1e-6)
