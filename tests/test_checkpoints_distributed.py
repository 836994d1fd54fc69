"""Crash safety on 2 real ranks: a rank SIGKILLed in the middle of writing a
checkpoint leaves the previous committed one as the resume target, and fresh
processes resuming from it reproduce the uninterrupted run bit for bit."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from helpers import RaggedLM, losses_of, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments
from scaletrain.checkpoint import latest_checkpoint
from scaletrain.strategies import build_strategy

STEPS, TRAIN_N = 10, 150


def _args(out: str, strategy: str) -> TrainingArguments:
    return TrainingArguments(output_dir=out, strategy=strategy, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
                             save_steps=3, disable_tqdm=True, seed=0, ddp_timeout=60, optim="adamw_torch")


def _job(rank: int, out: str, strategy_name: str, resume: bool, kill_in_save_of: int) -> None:
    strategy = build_strategy(_args(out, strategy_name))
    strategy.setup_environment()
    trainer = Trainer(model=tiny_gpt2(), args=_args(out, strategy_name), train_dataset=RaggedLM(TRAIN_N),
                      strategy=strategy)
    if kill_in_save_of:
        gather = strategy.full_model_tensors  # every strategy's save runs it on every rank, state written or not

        def gather_then_die(*args, **kwargs):
            yield from gather(*args, **kwargs)
            if rank == 1 and trainer.state.global_step == kill_in_save_of:
                os.kill(os.getpid(), signal.SIGKILL)  # parts on disk, checkpoint not committed

        strategy.full_model_tensors = gather_then_die
    trainer.train(resume_from_checkpoint=True if resume else None)
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps({"losses": losses_of(trainer)}))
        torch.save({k: v.detach().cpu() for k, v in strategy.full_model_state_dict(trainer.model_wrapped).items()},
                   Path(out, "weights.pt"))
    else:
        strategy.full_model_state_dict(trainer.model_wrapped)  # a collective under sharded strategies
    strategy.teardown()


@pytest.mark.parametrize("strategy_name", ["ddp", "fsdp", "zero2"])
def test_kill_during_save_then_resume_in_fresh_processes(strategy_name, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_ranks(_job, str(clean), strategy_name, False, 0)
    with pytest.raises(ProcessExitedException, match="signal SIGKILL"):
        run_ranks(_job, str(crashed), strategy_name, False, 6)
    # checkpoint-6 was being written when rank 1 died: never committed
    assert (crashed / "checkpoint-6.tmp").is_dir() and not (crashed / "checkpoint-6").exists()
    assert latest_checkpoint(crashed).name == "checkpoint-3"

    run_ranks(_job, str(crashed), strategy_name, True, 0)  # resume_from_checkpoint=True
    resumed = json.loads((crashed / "result.json").read_text())["losses"]
    expected = json.loads((clean / "result.json").read_text())["losses"]
    # same ranks, data position, RNG and optimizer state: bit-identical in fp32
    assert resumed == expected
    a, b = torch.load(clean / "weights.pt"), torch.load(crashed / "weights.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


class ScoreByCall:
    """compute_metrics whose best evaluation is the second of three (step 4)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pred) -> dict:
        self.calls += 1
        return {"score": {1: 1.0, 2: 3.0, 3: 2.0}.get(self.calls, 0.0)}


def _best_job(rank: int, out: str, strategy_name: str) -> None:
    args = TrainingArguments(output_dir=out, strategy=strategy_name, per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-2, eval_strategy="steps", eval_steps=2, save_steps=2,
                             save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score",
                             per_device_eval_batch_size=4, disable_tqdm=True, seed=0, ddp_timeout=60,
                             optim="adamw_torch")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(48), eval_dataset=RaggedLM(8, seed=2),
                      compute_metrics=ScoreByCall())
    trainer.train()
    trainer.save_model(f"{out}/final")  # the best model, loaded back at the end
    trainer.strategy.teardown()


@pytest.mark.parametrize("strategy_name", ["fsdp", "zero3"])
def test_retention_keeps_best_and_latest_and_the_best_model_is_loaded(strategy_name, tmp_path):
    run_ranks(_best_job, str(tmp_path), strategy_name)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    from safetensors.torch import load_file

    from scaletrain.checkpoint.export import consolidated_state_dict

    final = load_file(str(tmp_path / "final" / "model.safetensors"))

    def saved(step: int) -> dict:
        path = tmp_path / f"checkpoint-{step}"
        return consolidated_state_dict(path, json.loads((path / "manifest.json").read_text()), tiny_gpt2())

    best, latest = saved(4), saved(6)
    assert max((final[k] - best[k]).abs().max().item() for k in final) == 0.0
    assert max((final[k] - latest[k]).abs().max().item() for k in final) > 1e-3
