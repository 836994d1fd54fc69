"""DDP on 2 real gloo ranks against one process: loss curve, weights,
distributed evaluate/predict, and resume — grouped in one spawned job."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments

STEPS, EVAL_N = 10, 21  # 21 eval rows: ranks get 10 and 11, uneven on purpose


def _args(out: str, per_device: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=3e-3, logging_steps=1, save_steps=5, eval_strategy="no", per_device_eval_batch_size=4,
        disable_tqdm=True, seed=0, ddp_timeout=120, optim="adamw_torch", include_num_input_tokens_seen="non_padding",
        **kw,
    )


class MetricsRecorder:
    """compute_metrics that records exactly what it was shown."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, pred):
        self.calls.append(len(pred.label_ids))
        labels = pred.label_ids
        return {"n_samples": len(labels), "n_targets": int((labels != -100).sum())}


class BatchMetricsRecorder:
    """A batch_eval_metrics compute_metrics: the rows and targets of every batch it is shown."""

    def __init__(self) -> None:
        self.samples = self.targets = 0

    def __call__(self, pred, compute_result: bool):
        self.samples += len(pred.label_ids)
        self.targets += int((pred.label_ids != -100).sum())
        return {"n_samples": self.samples, "n_targets": self.targets} if compute_result else {}


def _batch_metrics(model, out: str) -> dict:
    """evaluate() with HF's per-batch metrics on the trained model."""
    trainer = Trainer(model=model, args=_args(out, per_device=2, strategy="ddp", batch_eval_metrics=True),
                      eval_dataset=RaggedLM(EVAL_N, seed=2), compute_metrics=BatchMetricsRecorder())
    return trainer.evaluate()


DDP_FIELDS = dict(ddp_backend="gloo", ddp_find_unused_parameters=False, ddp_bucket_cap_mb=1,
                  ddp_broadcast_buffers=False, ddp_static_graph=True)


def _ddp_options(wrapper) -> dict:
    """What the DistributedDataParallel wrapper and the process group were built with."""
    group = torch.distributed.group.WORLD
    return {"backend": torch.distributed.get_backend(), "find_unused": wrapper.find_unused_parameters,
            "bucket_bytes": wrapper.bucket_bytes_cap, "broadcast_buffers": wrapper.broadcast_buffers,
            "static_graph": wrapper.static_graph, "grads_in_buckets": wrapper.gradient_as_bucket_view,
            "timeout_s": group._get_backend(torch.device("cpu")).options._timeout.total_seconds()}


def _ddp_job(rank: int, out: str) -> None:
    recorder = MetricsRecorder()
    trainer = Trainer(model=tiny_gpt2(), args=_args(f"{out}/run", per_device=2, strategy="ddp", **DDP_FIELDS),
                      train_dataset=RaggedLM(64), eval_dataset=RaggedLM(EVAL_N, seed=2), compute_metrics=recorder)
    trainer.train()
    wrapper = _ddp_options(trainer.model_wrapped)
    metrics = trainer.evaluate()
    pred = trainer.predict(RaggedLM(EVAL_N, seed=2))
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    resumed = Trainer(model=tiny_gpt2(seed=123), args=_args(f"{out}/run", per_device=2, strategy="ddp"),
                      train_dataset=RaggedLM(64))
    resumed.train(resume_from_checkpoint=f"{out}/run/checkpoint-5")
    resumed_weights = resumed.model.state_dict()
    batch_metrics = _batch_metrics(trainer.model, f"{out}/batch_metrics")
    if rank == 0:
        Path(out, "ddp.json").write_text(json.dumps({
            "losses": losses_of(trainer), "resumed_losses": losses_of(resumed), "metrics": metrics,
            "compute_metrics_calls": recorder.calls, "batch_metrics": batch_metrics, "ddp_options": wrapper,
            "tokens_seen": [trainer.state.num_input_tokens_seen, resumed.state.num_input_tokens_seen],
            "resume_max_weight_diff": max((weights[k] - resumed_weights[k]).abs().max().item() for k in weights),
        }))
        np.save(Path(out, "preds.npy"), pred.predictions)
        torch.save(weights, Path(out, "weights.pt"))


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_ddp_job, str(out))
    return out, json.loads((out / "ddp.json").read_text())


@pytest.fixture(scope="module")
def single_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    recorder = MetricsRecorder()
    # one process, 4 rows per micro-batch == 2 ranks x 2 rows: same global batch
    trainer = Trainer(model=tiny_gpt2(), args=_args(str(out), per_device=4, strategy="single"),
                      train_dataset=RaggedLM(64), eval_dataset=RaggedLM(EVAL_N, seed=2), compute_metrics=recorder)
    trainer.train()
    return trainer, trainer.evaluate(), trainer.predict(RaggedLM(EVAL_N, seed=2)), recorder


def test_ddp_loss_curve_matches_single_process(ddp_result, single_result):
    _, ddp = ddp_result
    single_trainer = single_result[0]
    single = losses_of(single_trainer)
    assert len(ddp["losses"]) == len(single) == STEPS
    # fp32; the only differences are the all-reduce summation order and
    # per-rank matmul shapes: measured ~1e-7 relative, 1e-5 leaves margin while
    # a wrong normalisation (e.g. mean of micro-batch means) is off by >1e-2.
    np.testing.assert_allclose(ddp["losses"], single, rtol=1e-5, atol=0)
    assert single[-1] < single[0] - 0.05, "the run should actually learn"


def test_ddp_fields_reach_the_wrapper_and_the_process_group(ddp_result):
    _, ddp = ddp_result
    assert ddp["ddp_options"] == {"backend": "gloo", "find_unused": False, "bucket_bytes": 1024 * 1024,
                                  "broadcast_buffers": False, "static_graph": True, "timeout_s": 120.0,
                                  "grads_in_buckets": True}  # scaletrain's default (DDP's is False)


def test_ddp_final_weights_match_single_process(ddp_result, single_result):
    out, _ = ddp_result
    ddp_weights = torch.load(out / "weights.pt", weights_only=True)
    single_weights = single_result[0].model.state_dict()
    worst = max((ddp_weights[k] - single_weights[k]).abs().max().item() for k in single_weights)
    assert worst < 1e-5, f"DDP weights drifted from single-process by {worst}"


def test_distributed_evaluate_and_predict_see_every_sample_once(ddp_result, single_result):
    out, ddp = ddp_result
    _, single_metrics, single_pred, single_recorder = single_result
    assert ddp["compute_metrics_calls"] == [EVAL_N, EVAL_N]  # evaluate + predict, each with all rows once
    assert single_recorder.calls == [EVAL_N, EVAL_N]
    assert ddp["metrics"]["eval_n_samples"] == EVAL_N
    # per-batch metrics: every rank's batches in each round (ranks have 3 batches of 4, 4, 2|3 rows)
    assert ddp["batch_metrics"]["eval_n_samples"] == EVAL_N
    assert ddp["batch_metrics"]["eval_n_targets"] == single_metrics["eval_n_targets"]
    assert ddp["metrics"]["eval_n_targets"] == single_metrics["eval_n_targets"]
    np.testing.assert_allclose(ddp["metrics"]["eval_loss"], single_metrics["eval_loss"], rtol=1e-5)
    ddp_preds = np.load(out / "preds.npy")
    assert ddp_preds.shape == single_pred.predictions.shape == (EVAL_N, 16, 64)
    np.testing.assert_allclose(ddp_preds, single_pred.predictions, atol=2e-4, rtol=0)


def test_ddp_resume_continues_the_loss_curve(ddp_result):
    _, ddp = ddp_result
    # steps 6..10 after resuming from checkpoint-5 replay the uninterrupted run
    # bit for bit: same ranks, same data position, restored RNG and optimizer.
    # The restored log history holds steps 1..5, so the curves compare whole.
    assert len(ddp["resumed_losses"]) == STEPS
    assert ddp["resumed_losses"] == ddp["losses"]
    assert ddp["resume_max_weight_diff"] == 0.0


def test_ddp_counts_the_input_tokens_of_every_rank(ddp_result, single_result):
    _, ddp = ddp_result
    # 10 steps of 8 rows: all 64 rows of epoch 0, then the first 16 of epoch 1's order (a permutation
    # seeded by seed + epoch); non-padding tokens
    rows = RaggedLM(64).rows
    epoch_1 = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:16].tolist()
    expected = sum(int(r["attention_mask"].sum()) for r in rows) + sum(int(rows[i]["attention_mask"].sum())
                                                                       for i in epoch_1)
    assert single_result[0].state.num_input_tokens_seen == expected
    # both ranks' tokens, and carried over by the resumed run's checkpoint
    assert ddp["tokens_seen"] == [expected, expected]


def _encoder_decoder(seed: int = 0):
    """A warm-started encoder-decoder as HF users build one: a BERT encoder, whose pooler gets no
    gradient in this model, and a BERT decoder with cross-attention."""
    from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    torch.manual_seed(seed)
    small = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                 max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = BertModel(BertConfig(**small))
    decoder = BertLMHeadModel(BertConfig(**small, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
    return model


def _seq2seq_rows(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(2, 40, (8,), generator=g), "labels": torch.randint(2, 40, (6,), generator=g)}
            for _ in range(n)]


def _encoder_decoder_job(rank: int, out: str, strategy: str) -> None:
    args = TrainingArguments(output_dir=out, strategy=strategy, max_steps=4, per_device_train_batch_size=4 if
                             strategy == "ddp" else 8, learning_rate=1e-2, optim="sgd", logging_steps=1,
                             save_strategy="no", disable_tqdm=True, report_to="none", seed=0)
    trainer = Trainer(model=_encoder_decoder(), args=args, train_dataset=_seq2seq_rows())
    trainer.train()
    pooler = trainer.strategy.unwrap(trainer.model_wrapped).encoder.pooler.dense.weight
    torch.save({"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                "pooler_untouched": bool(torch.equal(pooler, _encoder_decoder().encoder.pooler.dense.weight))},
               f"{out}/result-{strategy}-{rank}.pt")
    trainer.strategy.teardown()


def test_a_warm_started_encoder_decoder_trains_under_ddp_with_unused_parameters(tmp_path):
    """HF's default finds the unused pooler; without it DDP fails at the second step."""
    _encoder_decoder_job(0, str(tmp_path), "single")
    run_ranks(_encoder_decoder_job, str(tmp_path), "ddp")
    single = torch.load(tmp_path / "result-single-0.pt")
    ddp = torch.load(tmp_path / "result-ddp-0.pt")
    assert ddp["pooler_untouched"] and single["pooler_untouched"]
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=1e-5)
