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
from scaletrain.errors import NotSupportedError

BAD_LR = 42.0  # model_init refuses it on every rank, as a bad hyperparameter would fail
DIVERGING_LR = 5.0  # its first evaluation is above the pruner's threshold


class RecordTrials(TrainerCallback):
    """Per rank: the trial each training ran, with the arguments and steps it really used."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref, self.runs = trainer_ref, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trial = self.trainer_ref[0]._trial
        self.runs.append({"trial": trial.number, "params": dict(trial.params), "learning_rate": args.learning_rate,
                          "lora": args.lora, "output_dir": args.output_dir, "world_size": args.world_size,
                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    def on_step_end(self, args, state, control, **kwargs):
        self.runs[-1]["steps"] = state.global_step


def _tiny_gpt2_built_by_hf():
    """from_config, so transformers partitions it at construction under ZeRO-3."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_gpt2().config)


def _built(model) -> dict:
    return {"partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()),
            "on_meta": all(p.is_meta for p in model.parameters())}


def _search_job(rank: int, out: str, options: dict, grid: list[float]) -> None:
    ref: list = []
    built: list[dict] = []
    pretrained = f"{out}/pretrained"
    if rank == 0:  # only rank 0 reads it (low-memory init), in trials long after this
        tiny_gpt2().save_pretrained(pretrained)

    def model_init(trial):
        if trial is not None and trial.params["learning_rate"] == BAD_LR:
            raise ValueError(f"learning_rate={BAD_LR} is refused by this model_init")
        if options.get("fsdp_low_memory_init"):  # as `scaletrain hpo` builds models: through the strategy
            from transformers import AutoModelForCausalLM

            strategy = ref[0].strategy if ref else None
            model = strategy.build_model(lambda: AutoModelForCausalLM.from_pretrained(pretrained),
                                         lambda: _tiny_gpt2_built_by_hf()) if strategy else tiny_gpt2()
        else:
            model = _tiny_gpt2_built_by_hf()
        built.append(_built(model))
        return model

    record = RecordTrials(ref)
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, save_steps=2, logging_steps=1, disable_tqdm=True, ddp_timeout=120,
                             optim="adamw_torch", seed=3, **options)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=RaggedLM(32),
                      eval_dataset=RaggedLM(9, seed=5), callbacks=[record])
    ref.append(trainer)

    def hp_space(trial):
        space = {"learning_rate": trial.suggest_categorical("learning_rate", grid)}
        if options.get("lora"):
            space["lora"] = {**options["lora"], "r": trial.suggest_categorical("lora_r", [2, 4])}
        return space

    grid_space = {"learning_rate": grid, **({"lora_r": [2, 4]} if options.get("lora") else {})}
    try:  # Ray places trials in workers of its own: refused on every rank of a multi-rank launch
        trainer.hyperparameter_search(backend="ray", n_trials=1)
        ray = "accepted"
    except NotSupportedError as exc:
        ray = str(exc)
    best = trainer.hyperparameter_search(
        hp_space=hp_space, n_trials=len(grid) * (2 if options.get("lora") else 1),
        sampler=optuna.samplers.GridSampler(grid_space, seed=0), pruner=optuna.pruners.ThresholdPruner(upper=4.3))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "runs": record.runs, "built": built, "best": [best.run_id, best.objective, best.hyperparameters],
        "args_after": trainer.args.output_dir, "ray": ray}))


def _ranks(out: Path) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def test_ddp_search_trains_every_trial_on_both_ranks_prunes_together_and_survives_a_failing_trial(tmp_path):
    out = tmp_path / "search"
    run_ranks(_search_job, str(out), {"strategy": "ddp"}, [1e-3, DIVERGING_LR, BAD_LR], timeout=300)
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
    assert "launched on 2 ranks" in rank0["ray"] and rank0["ray"] == rank1["ray"]


SHARDED = {"zero3": {"strategy": "zero3"}, "fsdp-low-memory-init": {"strategy": "fsdp", "fsdp_low_memory_init": True}}


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_search_builds_each_trial_sharded_and_in_step(tmp_path, name):
    out = tmp_path / "search"
    run_ranks(_search_job, str(out), SHARDED[name], [1e-3, 1e-2], timeout=400)
    rank0, rank1 = _ranks(out)
    assert rank0["runs"] == rank1["runs"] and len(rank0["runs"]) == 2
    assert [r["steps"] for r in rank0["runs"]] == [4, 4]
    assert rank0["best"] == rank1["best"]
    # the Trainer's first model and each trial's, as they were built
    if name == "zero3":  # ZeRO-3 partitioned every one at construction
        assert [b["partitioned"] for b in rank0["built"] + rank1["built"]] == [True] * 6
    else:  # rank 1 built them without storage; rank 0 alone read the weights
        assert [b["on_meta"] for b in rank0["built"]] == [False] * 3
        assert [b["on_meta"] for b in rank1["built"]] == [False, True, True]  # the first before any trial


def test_lora_rank_search_under_ddp_trains_the_adapter_each_trial_asks_for(tmp_path):
    out = tmp_path / "search"
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}
    run_ranks(_search_job, str(out), {"strategy": "ddp", "lora": lora}, [1e-3], timeout=400)
    rank0, rank1 = _ranks(out)
    assert rank0["runs"] == rank1["runs"] and len(rank0["runs"]) == 2
    for run in rank0["runs"]:
        r = run["params"]["lora_r"]
        assert {k: run["lora"][k] for k in lora} == {**lora, "r": r}
        assert run["trainable"] == 2 * r * (32 + 96)  # A and B of c_attn (32 -> 96) in 2 layers


def _one_rank_fails_job(rank: int, out: str) -> None:
    """model_init raises on rank 1 only (as one GPU running out of memory would): the ranks' collectives no
    longer match, so the search cannot go on; every rank must leave with an error, none may hang."""
    import time

    def model_init(trial):
        if trial is not None and rank == 1:
            raise RuntimeError("rank 1 only")
        return tiny_gpt2()

    args = TrainingArguments(output_dir=out, strategy="ddp", max_steps=2, per_device_train_batch_size=4,
                             disable_tqdm=True, ddp_timeout=15, save_strategy="no")
    trainer = Trainer(model_init=model_init, args=args, train_dataset=RaggedLM(16))
    start = time.monotonic()
    try:
        trainer.hyperparameter_search(hp_space=lambda t: {"seed": t.suggest_int("seed", 1, 4)}, n_trials=2)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "s": time.monotonic() - start}))


def test_a_failure_on_one_rank_only_ends_the_search_on_every_rank_within_the_timeout(tmp_path):
    """Each rank either raises (its outcome file says so) or is ended by gloo (a collective that no longer
    matches aborts the process); none returns as if the search had finished, and none hangs."""
    import time

    import torch.multiprocessing as mp

    from helpers import _entry, free_port

    out = tmp_path / "search"
    out.mkdir()
    start = time.monotonic()
    ctx = mp.start_processes(_entry, args=(_one_rank_fails_job, 2, free_port(), (str(out),)), nprocs=2,
                             join=False, start_method="spawn")
    for process in ctx.processes:
        process.join(timeout=max(1.0, 200 - (time.monotonic() - start)))
    assert not any(p.is_alive() for p in ctx.processes), "a rank hung"
    assert time.monotonic() - start < 200
    for rank, process in enumerate(ctx.processes):
        outcome = out / f"rank{rank}.json"
        if outcome.exists():
            result = json.loads(outcome.read_text())
            assert result["outcome"] != "returned" and result["s"] < 4 * 15, result
        else:
            assert process.exitcode != 0  # ended by the broken collective
