"""HF's evaluation and accounting options against transformers.Trainer on the same model and data:
include_for_metrics, batch_eval_metrics, eval_do_concat_batches, eval_accumulation_steps,
include_num_input_tokens_seen, skip_memory_metrics, torch_empty_cache_steps."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import transformers

from helpers import RaggedLM, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.trainer import loop

EVAL_ROWS, EVAL_BATCH = 20, 8  # batches of 8, 8 and 4 rows: a ragged last batch


def both_trainers(tmp_path, common: dict, compute_metrics=None, train_rows: int = 32) -> dict:
    """{"hf": transformers.Trainer, "ours": scaletrain.Trainer} with the same model, data and arguments."""
    trainers = {}
    common = {"per_device_eval_batch_size": EVAL_BATCH, **common}
    for name, trainer_cls, args_cls, extra in (
            ("hf", transformers.Trainer, transformers.TrainingArguments, {"use_cpu": True}),
            ("ours", Trainer, TrainingArguments, {"strategy": "single"})):
        args = args_cls(output_dir=str(tmp_path / name), seed=0,
                        disable_tqdm=True, report_to="none", save_strategy="no", **common, **extra)
        metrics = compute_metrics() if compute_metrics is not None else None
        trainers[name] = trainer_cls(model=tiny_llama(), args=args, train_dataset=RaggedLM(train_rows),
                                     eval_dataset=RaggedLM(EVAL_ROWS, seed=4), compute_metrics=metrics)
    return trainers


class RecordedEvalPrediction:
    """compute_metrics that keeps what it was given and returns a token accuracy."""

    def __init__(self) -> None:
        self.seen = None

    def __call__(self, pred):
        self.seen = pred
        predictions = pred.predictions.argmax(-1)[:, :-1]
        labels = pred.label_ids[:, 1:]
        valid = labels != -100
        metrics = {"accuracy": float((predictions == labels)[valid].mean())}
        if pred.losses is not None:
            metrics["mean_loss"] = float(pred.losses.mean())
        return metrics


def test_include_for_metrics_passes_inputs_and_losses_as_hf_does(tmp_path):
    trainers = both_trainers(tmp_path, {"include_for_metrics": ["inputs", "loss"]}, RecordedEvalPrediction)
    metrics = {name: trainer.evaluate() for name, trainer in trainers.items()}
    hf, ours = (trainers[name].compute_metrics.seen for name in ("hf", "ours"))
    np.testing.assert_array_equal(ours.inputs, hf.inputs)
    assert ours.inputs.shape == (EVAL_ROWS, 16)
    # one loss per row: its batch's mean, as HF repeats it
    assert ours.losses.shape == hf.losses.shape == (EVAL_ROWS,)
    np.testing.assert_allclose(ours.losses, hf.losses, rtol=1e-6)
    np.testing.assert_allclose(ours.predictions, hf.predictions, atol=1e-5, rtol=0)
    assert metrics["ours"]["eval_accuracy"] == metrics["hf"]["eval_accuracy"]
    np.testing.assert_allclose(metrics["ours"]["eval_mean_loss"], metrics["hf"]["eval_mean_loss"], rtol=1e-6)


class StreamingAccuracy:
    """A batch_eval_metrics compute_metrics: accumulates over batches, answers on the last."""

    def __init__(self) -> None:
        self.correct = self.total = self.calls = 0
        self.types = set()

    def __call__(self, pred, compute_result: bool):
        self.calls += 1
        self.types.add(type(pred.predictions).__name__)
        predictions = pred.predictions.argmax(-1)[:, :-1]
        labels = pred.label_ids[:, 1:]
        valid = labels != -100
        self.correct += int((predictions == labels)[valid].sum())
        self.total += int(valid.sum())
        if not compute_result:
            return {}
        result = {"accuracy": self.correct / self.total, "targets": self.total, "batches": self.calls}
        self.correct = self.total = self.calls = 0
        return result


def test_batch_eval_metrics_compute_per_batch_as_hf_does(tmp_path):
    trainers = both_trainers(tmp_path, {"batch_eval_metrics": True}, StreamingAccuracy)
    metrics = {name: trainer.evaluate() for name, trainer in trainers.items()}
    for key in ("eval_accuracy", "eval_targets", "eval_batches"):
        assert metrics["ours"][key] == metrics["hf"][key], key
    assert metrics["ours"]["eval_batches"] == 3
    assert trainers["ours"].compute_metrics.types == trainers["hf"].compute_metrics.types == {"Tensor"}
    # predict() still returns every prediction, as HF's does
    assert trainers["ours"].predict(RaggedLM(EVAL_ROWS, seed=4)).predictions.shape == (EVAL_ROWS, 16, 64)


def test_batch_eval_metrics_need_a_compute_result_argument(tmp_path):
    with pytest.raises(ValueError, match="add a `compute_result` argument"):
        Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path), strategy="single",
                                                           batch_eval_metrics=True),
                compute_metrics=RecordedEvalPrediction())


def _peak_host_bytes_of_evaluate(trainer) -> int:
    tracemalloc.start()
    try:
        trainer.evaluate()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_batch_eval_metrics_bound_the_host_memory_of_evaluation(tmp_path):
    """Whole-set evaluation holds every row's logits on the host; per-batch metrics one batch's."""
    peaks = {}
    for per_batch in (False, True):
        metrics = StreamingAccuracy() if per_batch else RecordedEvalPrediction()
        args = TrainingArguments(output_dir=str(tmp_path / str(per_batch)), strategy="single", report_to="none",
                                 per_device_eval_batch_size=EVAL_BATCH, batch_eval_metrics=per_batch)
        trainer = Trainer(model=tiny_llama(), args=args, eval_dataset=RaggedLM(256, seed=4),
                          compute_metrics=metrics)
        trainer.evaluate()  # warm-up: lazily built caches are not the evaluation's memory
        peaks[per_batch] = _peak_host_bytes_of_evaluate(trainer)
    all_logits = 256 * 16 * 64 * 4
    assert peaks[False] > all_logits, peaks  # measured 2.0x: the logits, and their concatenation
    assert peaks[True] < all_logits / 4, peaks  # measured 0.07x: about two batches' logits


def test_unconcatenated_batches_and_accumulation_steps_give_hf_predictions(tmp_path):
    lists = both_trainers(tmp_path / "lists", {"eval_do_concat_batches": False})
    outputs = {name: trainer.predict(RaggedLM(EVAL_ROWS, seed=4)) for name, trainer in lists.items()}
    ours, hf = outputs["ours"].predictions, outputs["hf"].predictions
    assert isinstance(ours, list) and [p.shape[0] for p in ours] == [p.shape[0] for p in hf] == [8, 8, 4]
    for mine, theirs in zip(ours, hf, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    assert [len(p) for p in outputs["ours"].label_ids] == [8, 8, 4]
    accumulated = both_trainers(tmp_path / "accumulated", {"eval_accumulation_steps": 2})["ours"]
    np.testing.assert_array_equal(accumulated.predict(RaggedLM(EVAL_ROWS, seed=4)).predictions, np.concatenate(ours))


@pytest.mark.parametrize("mode", ["all", "non_padding"])
def test_input_tokens_seen_and_memory_metrics_match_the_hf_trainer(tmp_path, mode):
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=0.1,
                  optim="sgd", logging_steps=3, eval_strategy="steps", eval_steps=4,
                  include_num_input_tokens_seen=mode, skip_memory_metrics=False)
    trainers = both_trainers(tmp_path, common)
    train_metrics = {name: trainer.train().metrics for name, trainer in trainers.items()}
    eval_metrics = {name: trainer.evaluate() for name, trainer in trainers.items()}
    seen = {name: [(e["step"], e["num_input_tokens_seen"]) for e in trainer.state.log_history]
            for name, trainer in trainers.items()}
    assert seen["ours"] == seen["hf"]  # every log (train, eval, the summary) with the count at its step
    rows = RaggedLM(32).rows
    per_epoch = sum(int(r["attention_mask"].sum()) if mode == "non_padding" else r["input_ids"].numel() for r in rows)
    assert trainers["ours"].state.num_input_tokens_seen == 2 * per_epoch
    # HF's memory keys (init_/train_/eval_mem_cpu_*); scaletrain adds train_tokens_per_second
    ours_only = {"train_tokens_per_second", "train_tflops_per_rank", "train_peak_memory_gb"}
    assert set(train_metrics["ours"]) - ours_only == set(train_metrics["hf"])
    assert set(eval_metrics["ours"]) == set(eval_metrics["hf"])
    assert {"train_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"} <= set(train_metrics["ours"]) | \
        set(eval_metrics["ours"])


def test_torch_empty_cache_steps_clears_the_cache_every_n_steps(tmp_path, monkeypatch):
    cleared_at = []
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(
        output_dir=str(tmp_path), strategy="single", max_steps=7, torch_empty_cache_steps=3, report_to="none",
        save_strategy="no", per_device_train_batch_size=4), train_dataset=RaggedLM(32))
    monkeypatch.setattr(loop, "clear_device_cache", lambda: cleared_at.append(trainer.state.global_step))
    trainer.train()
    assert cleared_at == [3, 6]


@pytest.mark.parametrize("flag, dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_casts_the_model_outside_training_as_hf_does(tmp_path, flag, dtype):
    # every step takes all 32 rows (8 x 4), so HF's own shuffling cannot change a step
    trainers = both_trainers(tmp_path, {flag: True, "max_steps": 2, "eval_strategy": "steps", "eval_steps": 1,
                                        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
                                        "optim": "sgd", "learning_rate": 0.5,
                                        # one evaluation batch: HF averages batch means, scaletrain all tokens
                                        "per_device_eval_batch_size": EVAL_ROWS})
    for trainer in trainers.values():
        trainer.train()  # evaluations during training run in the training precision: the model stays fp32
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    in_training = {name: [e["eval_loss"] for e in t.state.log_history if "eval_loss" in e]
                   for name, t in trainers.items()}
    np.testing.assert_allclose(in_training["ours"], in_training["hf"], rtol=1e-6)
    fp32 = in_training["ours"][-1]  # the trained model, evaluated in fp32 at the last step
    cast = {name: t.evaluate()["eval_loss"] for name, t in trainers.items()}
    for trainer in trainers.values():
        assert {p.dtype for p in trainer.model.parameters()} == {dtype}  # cast in place, and left so
    assert abs(cast["ours"] - fp32) > 1e-6  # the cast changed the computation (fp32 order noise: ~1e-7)
    np.testing.assert_allclose(cast["ours"], cast["hf"], rtol=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_full_eval_is_refused_where_the_backend_owns_the_parameters(tmp_path, strategy):
    with pytest.raises(NotSupportedError, match=f"bf16_full_eval=True with strategy '{strategy}'"):
        TrainingArguments(output_dir=str(tmp_path), strategy=strategy, bf16_full_eval=True)


def test_gathering_eval_outputs_as_objects_gives_hf_predictions_and_metrics(tmp_path):
    """eval_use_gather_object=True: the same predictions, labels and metrics as HF's trainer with it, and as
    scaletrain without it (its gather is object-based either way)."""
    recorders = {}

    def recorder():
        recorders[len(recorders)] = RecordedEvalPrediction()
        return recorders[len(recorders) - 1]

    gathered = both_trainers(tmp_path / "objects", {"eval_use_gather_object": True}, compute_metrics=recorder)
    plain = both_trainers(tmp_path / "tensors", {}, compute_metrics=recorder)["ours"]
    outputs = {name: trainer.predict(RaggedLM(EVAL_ROWS, seed=4)) for name, trainer in gathered.items()}
    reference = plain.predict(RaggedLM(EVAL_ROWS, seed=4))
    assert outputs["ours"].predictions.shape == (EVAL_ROWS, 16, 64)
    for output in (outputs["hf"], reference):
        np.testing.assert_allclose(outputs["ours"].predictions, output.predictions, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(outputs["ours"].label_ids, output.label_ids)
    assert outputs["ours"].metrics["test_accuracy"] == pytest.approx(outputs["hf"].metrics["test_accuracy"])
