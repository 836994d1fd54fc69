"""report_to tensorboard and mlflow on 2 real ranks: rank 0 alone writes, with HF's run name and arguments,
and what TensorBoard's event files and MLflow's store hold equals metrics.jsonl, value for value."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import RaggedLM, run_ranks, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _job(rank: int, out: str) -> None:
    # every rank gets the same settings, as a launcher hands them out; only rank 0 may write
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "loggers"
    os.environ["TENSORBOARD_LOGGING_DIR"] = f"{out}/tb-rank{rank}"
    args = TrainingArguments(output_dir=f"{out}/run", strategy="ddp", max_steps=4, logging_steps=1,
                             per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             disable_tqdm=True, run_name="two-ranks",
                             report_to=["tensorboard", "mlflow", "jsonl"])
    Trainer(model=tiny_llama(), args=args, train_dataset=RaggedLM(32), eval_dataset=RaggedLM(8, seed=2)).train()


def _jsonl(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds_written_by_rank_0_only(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_ranks(_job, str(tmp_path), timeout=300)
    losses, eval_losses = _jsonl(tmp_path, "loss"), _jsonl(tmp_path, "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and sorted(eval_losses) == [2, 4]

    assert not (tmp_path / "tb-rank1").exists()  # rank 1 writes nothing
    events = EventAccumulator(str(tmp_path / "tb-rank0"))
    events.Reload()
    for tag, expected in (("train/loss", losses), ("eval/loss", eval_losses)):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(expected, rel=1e-6), tag  # TensorBoard stores float32
    assert "args/text_summary" in events.Tags()["tensors"]  # HF writes the arguments as text

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("loggers")
    (run,) = client.search_runs([experiment.experiment_id])  # one run: rank 0's
    assert run.info.run_name == "two-ranks"
    assert run.data.params["learning_rate"] == str(5e-05) and run.data.params["max_steps"] == "4"
    for key, expected in (("loss", losses), ("eval_loss", eval_losses)):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == pytest.approx(expected, rel=1e-12), key


def test_report_to_all_means_every_installed_integration_and_unknown_ones_are_refused(tmp_path):
    from scaletrain.callbacks.reporters import installed_reporters

    assert {"tensorboard", "mlflow"} <= set(TrainingArguments(output_dir=str(tmp_path), report_to="all").report_to)
    assert TrainingArguments(output_dir=str(tmp_path), report_to="all").report_to == installed_reporters()
    with pytest.raises(NotSupportedError, match=r"\['comet_ml'\] not supported"):
        TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard", "comet_ml"])
