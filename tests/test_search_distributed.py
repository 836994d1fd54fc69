"""hyperparameter_search on 2 real gloo ranks: rank 0 owns the study, every rank trains the same trial,
a pruned trial stops on both ranks at the same step, a failing trial is recorded without a hang, and under
zero3 model_init still partitions the model as it is built."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from transformers.trainer_callback import TrainerCallback

from helpers import RaggedLM, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments

BAD_LR = 42.0  # model_init refuses it on every rank, as a bad hyperparameter would fail
DIVERGING_LR = 5.0  # its first evaluation is above the pruner's threshold


class RecordTrials(TrainerCallback):
    """Per rank: the trial each training ran, with the arguments and steps it really used."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.runs = trainer_ref, []

    def on_train_begin(self, args, state, control, **kwargs):
        trial = self.trainer_ref[0]._trial
        self.runs.append({"trial": trial.number, "params": dict(trial.params), "learning_rate": args.learning_rate,
                          "per_device_train_batch_size": args.per_device_train_batch_size,
                          "output_dir": args.output_dir, "world_size": args.world_size})

    def on_step_end(self, args, state, control, **kwargs):
        self.runs[-1]["steps"] = state.global_step


def _tiny_gpt2_built_by_hf():
    """from_config, so transformers partitions it at construction under ZeRO-3."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_gpt2().config)


def _search_job(rank: int, out: str, strategy: str, grid: list[float]) -> None:
    ref: list = []
    built: list[dict] = []

    def model_init(trial):
        if trial is not None and trial.params["learning_rate"] == BAD_LR:
            raise ValueError(f"learning_rate={BAD_LR} is refused by this model_init")
        model = _tiny_gpt2_built_by_hf()
        built.append({"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())})
        return model

    record = RecordTrials(ref)
    args = TrainingArguments(output_dir=out, strategy=strategy, max_steps=4, per_device_train_batch_size=4,
                             eval_strategy="steps", eval_steps=2, save_steps=2, logging_steps=1, disable_tqdm=True,
                             ddp_timeout=120, optim="adamw_torch", seed=3)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=RaggedLM(32),
                      eval_dataset=RaggedLM(9, seed=5), callbacks=[record])
    ref.append(trainer)
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_categorical("learning_rate", grid)}, n_trials=len(grid),
        sampler=optuna.samplers.GridSampler({"learning_rate": grid}, seed=0),
        pruner=optuna.pruners.ThresholdPruner(upper=4.3))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "runs": record.runs, "built": built, "best": [best.run_id, best.objective, best.hyperparameters],
        "args_after": trainer.args.output_dir}))


def _ranks(out: Path) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def test_ddp_search_trains_every_trial_on_both_ranks_prunes_together_and_survives_a_failing_trial(tmp_path):
    out = tmp_path / "search"
    run_ranks(_search_job, str(out), "ddp", [1e-3, DIVERGING_LR, BAD_LR], timeout=300)
    rank0, rank1 = _ranks(out)
    assert rank0["runs"] == rank1["runs"]  # same trials, same hyperparameters, same steps, on each rank
    runs = {r["params"]["learning_rate"]: r for r in rank0["runs"]}
    assert set(runs) == {1e-3, DIVERGING_LR}  # the refused one never started training
    for lr, run in runs.items():
        assert run["learning_rate"] == lr and run["world_size"] == 2
        assert run["output_dir"] == str(out / f"run-{run['trial']}")
    assert runs[1e-3]["steps"] == 4 and runs[DIVERGING_LR]["steps"] == 2  # pruned at its first evaluation
    table = json.loads((out / "trials.json").read_text())["trials"]
    states = {t["params"]["learning_rate"]: t["state"] for t in table}
    assert states == {1e-3: "COMPLETE", DIVERGING_LR: "PRUNED", BAD_LR: "FAIL"}
    failed = next(t for t in table if t["state"] == "FAIL")
    assert "is refused by this model_init" in failed["error"]
    complete = [t for t in table if t["state"] == "COMPLETE"]
    assert rank0["best"] == rank1["best"] == [str(complete[0]["number"]), complete[0]["values"][0],
                                              {"learning_rate": 1e-3}]
    assert rank0["args_after"] == rank1["args_after"] == str(out)


@pytest.mark.parametrize("strategy", ["zero3"])
def test_sharded_search_builds_each_trial_partitioned_and_in_step(tmp_path, strategy):
    out = tmp_path / "search"
    run_ranks(_search_job, str(out), strategy, [1e-3, 1e-2], timeout=400)
    rank0, rank1 = _ranks(out)
    assert rank0["runs"] == rank1["runs"] and len(rank0["runs"]) == 2
    assert [r["steps"] for r in rank0["runs"]] == [4, 4]
    # the Trainer's first model and each trial's: ZeRO-3 partitioned them while they were built
    assert rank0["built"] == rank1["built"] == [{"partitioned": True}] * 3
    assert rank0["best"] == rank1["best"]
