"""Causal-LM evaluate()/predict() against the HF Trainer on the same script.

GPT-2 and Llama outputs carry a KV cache (a DynamicCache object, not a tensor)
whenever config.use_cache is on. The HF Trainer turns the cache off at
construction and ignores the key `cache`; scaletrain must return the same
predictions, pass preprocess_logits_for_metrics the same logits tensor, and
never try to gather a cache object. Checked in one process and on 2 gloo ranks
(ddp) against transformers.Trainer(use_cpu=True) run in this test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from helpers import SEQ, VOCAB, run_ranks, tiny_gpt2, tiny_llama
from scaletrain import Trainer, TrainingArguments

N_ROWS, EVAL_BATCH = 11, 4
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def ragged_rows() -> list[dict[str, list[int]]]:
    """Rows of different lengths: per-batch padding makes batches of different widths."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(N_ROWS):
        length = int(torch.randint(4, SEQ + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def pad_collator(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LogitsRecorder:
    """preprocess_logits_for_metrics: records what it is given, keeps the argmax."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, logits, labels):
        self.seen.append(type(logits).__name__)
        return logits.argmax(-1)


def next_token_metrics(prediction) -> dict[str, float]:
    preds, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    valid = labels != -100
    # the checksum of the predicted ids differs unless every target position got the same prediction
    return {"accuracy": float((preds[valid] == labels[valid]).mean()), "targets": int(valid.sum()),
            "predicted_id_checksum": int((preds[valid].astype(np.int64) * np.arange(1, valid.sum() + 1)).sum())}


def forward_loss(model_name: str) -> float:
    """The model's own loss over all rows in one batch: the mean over every shifted target."""
    with torch.no_grad():
        return float(MODELS[model_name]()(**pad_collator(ragged_rows())).loss)


def run_both_apis(make_trainer) -> dict:
    """evaluate() with compute_metrics + preprocess_logits_for_metrics, a one-batch
    eval_loss, and predict() with raw logits, through one trainer factory."""
    recorder = LogitsRecorder()
    metrics = make_trainer(compute_metrics=next_token_metrics, preprocess_logits_for_metrics=recorder,
                           eval_batch=EVAL_BATCH).evaluate()
    one_batch = make_trainer(eval_batch=N_ROWS).evaluate()
    out = make_trainer(eval_batch=EVAL_BATCH).predict(ragged_rows())
    return {"metrics": metrics, "one_batch_loss": one_batch["eval_loss"], "seen": recorder.seen,
            "predictions": out.predictions, "label_ids": out.label_ids}


def hf_trainer_factory(model_name: str, tmp):
    def make(eval_batch: int, **kw):
        args = transformers.TrainingArguments(output_dir=str(tmp), use_cpu=True, report_to="none",
                                              per_device_eval_batch_size=eval_batch, disable_tqdm=True)
        return transformers.Trainer(model=MODELS[model_name](), args=args, eval_dataset=ragged_rows(),
                                    data_collator=pad_collator, **kw)
    return make


def scaletrain_factory(model_name: str, tmp, strategy: str):
    def make(eval_batch: int, **kw):
        args = TrainingArguments(output_dir=str(tmp), per_device_eval_batch_size=eval_batch, disable_tqdm=True,
                                 strategy=strategy)
        return Trainer(model=MODELS[model_name](), args=args, eval_dataset=ragged_rows(), data_collator=pad_collator,
                       **kw)
    return make


def assert_same_as_hf(ours: dict, hf: dict, model_name: str) -> None:
    width = max(len(r["input_ids"]) for r in ragged_rows())
    assert ours["predictions"].shape == hf["predictions"].shape == (N_ROWS, width, VOCAB)
    assert ours["label_ids"].shape == hf["label_ids"].shape
    np.testing.assert_array_equal(ours["label_ids"], hf["label_ids"])
    valid = hf["label_ids"] != -100  # the rest is padding, whose width depends on how rows fell into batches
    np.testing.assert_allclose(ours["predictions"][valid], hf["predictions"][valid], atol=1e-5)
    assert ours["seen"] and set(ours["seen"]) == set(hf["seen"]) == {"Tensor"}
    assert ours["metrics"]["eval_targets"] == hf["metrics"]["eval_targets"] == int(valid.sum()) - N_ROWS
    for key in ("eval_accuracy", "eval_predicted_id_checksum"):
        assert ours["metrics"][key] == hf["metrics"][key], key
    # the mean over every target, however rows fell into batches and ranks. Not compared with HF's eval_loss:
    # transformers 5.24 divides GPT-2's summed loss by the unshifted label count (docs/guides/hf-differences.md)
    reference = forward_loss(model_name)
    assert ours["one_batch_loss"] == pytest.approx(reference, rel=1e-6)
    assert ours["metrics"]["eval_loss"] == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory) -> dict[str, dict]:
    return {name: run_both_apis(hf_trainer_factory(name, tmp_path_factory.mktemp(f"hf-{name}"))) for name in MODELS}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_one_process_matches_the_hf_trainer(model_name, hf_reference, tmp_path):
    ours = run_both_apis(scaletrain_factory(model_name, tmp_path, "single"))
    assert_same_as_hf(ours, hf_reference[model_name], model_name)


def _two_rank_job(rank: int, out_dir: str) -> None:
    from pathlib import Path

    results = {name: run_both_apis(scaletrain_factory(name, Path(out_dir) / name, "ddp")) for name in MODELS}
    if rank == 0:
        for name, result in results.items():
            np.save(Path(out_dir) / f"{name}-predictions.npy", result["predictions"])
            np.save(Path(out_dir) / f"{name}-label_ids.npy", result["label_ids"])
            (Path(out_dir) / f"{name}.json").write_text(json.dumps(
                {k: result[k] for k in ("metrics", "one_batch_loss", "seen")}))


def test_two_ranks_match_the_hf_trainer(hf_reference, tmp_path):
    run_ranks(_two_rank_job, str(tmp_path))
    for name in MODELS:
        ours = json.loads((tmp_path / f"{name}.json").read_text())
        ours["predictions"] = np.load(tmp_path / f"{name}-predictions.npy")
        ours["label_ids"] = np.load(tmp_path / f"{name}-label_ids.npy")
        assert_same_as_hf(ours, hf_reference[name], name)


def test_use_cache_is_honoured_and_a_cache_is_never_gathered(tmp_path):
    model = tiny_llama()
    assert model.config.use_cache  # transformers' default, which the trainer overrides as HF's does
    trainer = scaletrain_factory("llama", tmp_path, "single")(eval_batch=EVAL_BATCH)
    assert trainer.model.config.use_cache is False
    cached = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cache=True, strategy="single",
                                                         disable_tqdm=True, per_device_eval_batch_size=EVAL_BATCH),
                     eval_dataset=ragged_rows(), data_collator=pad_collator)
    assert model.config.use_cache is True
    with torch.no_grad():
        outputs = model(**pad_collator(ragged_rows()[:2]))
    assert not isinstance(outputs["cache"], torch.Tensor)  # the object that cannot be gathered
    # no ignore keys at all: the cache is still not a prediction
    out = cached.predict(ragged_rows(), ignore_keys=[])
    assert isinstance(out.predictions, np.ndarray) and out.predictions.shape[::2] == (N_ROWS, VOCAB)
