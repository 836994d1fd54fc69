"""The layout (parallelism_config) on real ranks: HSDP, FSDP2 replicated over dp_replicate and sharded over
dp_shard, on 4 gloo ranks against one process (SGD, so float-order noise is not amplified: measured
~1e-7), its checkpoint resumed under another layout and in one process; and every way to ask for a
layout (HF's field as accelerate's class, a dict, JSON, YAML, HF's hybrid_shard) with bad ones refused
before any process group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import ParallelismConfig as AccelerateParallelismConfig

from helpers import RaggedLM, losses_of, run_ranks, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.errors import NotSupportedError
from scaletrain.parallel.environment import DistEnv
from scaletrain.parallel.layout import ParallelLayout

STEPS, ROWS = 6, 48


def _args(out, per_device: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=per_device, max_steps=STEPS,
                             learning_rate=0.5, optim="sgd", logging_steps=1, save_steps=3, disable_tqdm=True,
                             report_to="none", seed=0, ddp_timeout=300, **kw)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.strategy.full_model_state_dict(
        trainer.model_wrapped).items()}


def _hsdp_job(rank: int, out: str) -> None:
    hsdp = Trainer(model=tiny_llama(), args=_args(f"{out}/hsdp", 2, parallelism_config={
        "dp_replicate_size": 2, "dp_shard_size": 2}), train_dataset=RaggedLM(ROWS))
    hsdp.train()
    param = next(hsdp.model_wrapped.parameters())
    mesh = {"dims": list(param.device_mesh.mesh_dim_names), "placements": [str(p) for p in param.placements],
            "describe": hsdp.strategy.describe()}
    weights = _weights(hsdp)
    flat = Trainer(model=tiny_llama(seed=9), args=_args(f"{out}/hsdp", 2, strategy="fsdp"),
                   train_dataset=RaggedLM(ROWS))
    flat.train(resume_from_checkpoint=f"{out}/hsdp/checkpoint-3")  # 2x2 saved, 1 x 4 resumed
    flat_weights = _weights(flat)
    if rank == 0:
        Path(out, "hsdp.json").write_text(json.dumps({"losses": losses_of(hsdp), "mesh": mesh}))
        torch.save({"hsdp": weights, "flat": flat_weights}, Path(out, "weights.pt"))


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    run_ranks(_hsdp_job, str(out), world_size=4, timeout=420)
    return out, json.loads((out / "hsdp.json").read_text()), torch.load(out / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path_factory.mktemp("one"), 8, strategy="single"),
                      train_dataset=RaggedLM(ROWS))
    trainer.train()
    return trainer


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def test_hsdp_shards_over_dp_shard_replicates_over_dp_replicate_and_matches_one_process(hsdp_run, one_process):
    _, result, weights = hsdp_run
    assert result["mesh"]["dims"] == ["dp_replicate", "dp_shard"]
    assert result["mesh"]["placements"] == ["R", "S(0)"]  # replicated across dp_replicate, sharded in dp_shard
    assert "2 dp_replicate x 2 dp_shard" in result["mesh"]["describe"]
    # 4 ranks x 2 rows = one process x 8 rows: the same global batch, step by step
    assert result["losses"] == pytest.approx(losses_of(one_process), rel=1e-5)
    reference = {k: v.detach().clone() for k, v in one_process.model.state_dict().items()}
    assert _max_diff(weights["hsdp"], reference) < 1e-5
    assert _max_diff(reference, {k: v.detach() for k, v in tiny_llama().state_dict().items()}) > 1e-3


def test_an_hsdp_checkpoint_resumes_under_another_layout_and_in_one_process(hsdp_run, one_process, tmp_path):
    out, _, weights = hsdp_run
    reference = {k: v.detach().clone() for k, v in one_process.model.state_dict().items()}
    assert _max_diff(weights["flat"], reference) < 1e-5  # resumed as 1 x 4 (plain FSDP) on the same ranks
    manifest = json.loads((out / "hsdp" / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["layout"] == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "sp": 1, "tp": 1}
    single = Trainer(model=tiny_llama(seed=5), args=_args(tmp_path, 8, strategy="single"),
                     train_dataset=RaggedLM(ROWS))
    single.train(resume_from_checkpoint=str(out / "hsdp" / "checkpoint-3"))
    assert _max_diff({k: v.detach() for k, v in single.model.state_dict().items()}, reference) < 1e-5


def _env(world: int, local: int = 0) -> DistEnv:
    return DistEnv(0, world, 0, local or world)


@pytest.mark.parametrize("given", [
    {"dp_replicate_size": 2, "dp_shard_size": 2},
    AccelerateParallelismConfig(dp_replicate_size=2, dp_shard_size=2),
    '{"dp_replicate_size": 2, "dp_shard_size": 2}',
    {"dp_replicate_size": 2, "dp_shard_size": -1},
])
def test_every_spelling_of_a_layout_gives_the_same_one(given):
    args = TrainingArguments(output_dir="unused", parallelism_config=given)
    layout = ParallelLayout.resolve(_env(4), args.parallelism_config)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp, layout.dp_size) == (2, 2, 1, 4)
    assert args.strategy == "fsdp"  # sharding asked for under strategy auto
    assert json.loads(args.to_json_string())["parallelism_config"]["dp_shard_size"] in (2, -1)


def test_sequence_ranks_sit_between_the_data_parallel_and_the_tensor_parallel_ranks():
    """(dp_replicate, dp_shard, sp, tp) with tp innermost: a row's sp ranks read the same data-parallel shard."""
    args = TrainingArguments(output_dir="unused", parallelism_config={"dp_shard_size": 2, "sp_size": 2, "tp_size": 2})
    layouts = [ParallelLayout.resolve(DistEnv(rank, 8, rank, 8), args.parallelism_config) for rank in range(8)]
    assert [(layout.dp_rank, layout.sp_rank) for layout in layouts] == [
        (0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]
    assert (layouts[0].dp_size, layouts[0].batch_ranks) == (2, 4)
    assert layouts[0].describe() == "2 dp_shard x 2 sp x 2 tp"


def test_hf_hybrid_shard_shards_in_the_node_and_replicates_across_nodes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    args = TrainingArguments(output_dir="unused", fsdp="hybrid_shard")
    layout = ParallelLayout.resolve(DistEnv(0, 8, 0, 4), args.parallelism_config)
    assert (args.strategy, layout.dp_replicate, layout.dp_shard) == ("fsdp", 2, 4)


@pytest.mark.parametrize(("given", "error", "message"), [
    ({"dp_shard_size": 3}, ValueError, r"dp_replicate_size=1 x dp_shard_size=3 x tp_size=1 x sp_size=1 x pp_size=1 "
                                       r"lays out 3 ranks, but this launch has 4"),
    ({"dp_shrad_size": 2}, ValueError, r"unknown key 'dp_shrad_size'; did you mean 'dp_shard_size'"),
    ({"tp_size": 3, "dp_shard_size": 2}, ValueError,
     r"tp_size=3 x sp_size=1 x pp_size=1 lays out 6 ranks, but this launch has 4"),
    # under strategy auto too, where no strategy's own check runs
    ({"cp_size": 2}, NotSupportedError, r"cp_size=2: context parallelism .* use sp_size"),
    ({"sp_size": 2, "dp_shard_size": 4}, ValueError, r"sp_size=2 x pp_size=1 lays out 8 ranks, but this launch has 4"),
    ({"pp_size": 2, "dp_shard_size": 2}, ValueError,
     r"pp_schedule='1F1B' with 2 stages needs at least 2 micro-batches per step, but gradient_accumulation_steps=1"),
])
def test_bad_layouts_are_refused_naming_the_value(given, error, message):
    with pytest.raises(error, match=message):
        args = TrainingArguments(output_dir="unused", parallelism_config=given)
        ParallelLayout.resolve(_env(4), args.parallelism_config)


@pytest.mark.parametrize(("strategy", "given", "message"), [
    ("ddp", {"dp_shard_size": 2}, "DDP replicates the whole model"),
    ("zero2", {"dp_replicate_size": 2, "dp_shard_size": 2}, "DeepSpeed ZeRO partitions over every rank"),
    ("zero3", {"tp_size": 2, "dp_shard_size": 2}, "neither its AutoTP nor its Ulysses"),
    ("ddp", {"tp_size": 2, "dp_shard_size": 2}, "DDP replicates the whole model"),
    ("ddp", {"pp_size": 2, "pp_schedule": "GPipe"}, "or to run pipeline stages"),
])
def test_a_layout_the_strategy_cannot_run_is_refused(strategy, given, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir="unused", strategy=strategy, parallelism_config=given)


def test_the_cli_refuses_a_layout_the_launch_cannot_hold_before_any_process_group(tmp_path, monkeypatch, capsys):
    from scaletrain.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    config = tmp_path / "layout.yaml"
    config.write_text("training:\n  output_dir: out\n  parallelism_config: {dp_replicate_size: 3, dp_shard_size: 2}\n")
    assert main(["train", str(config)]) == 2
    assert "lays out 6 ranks, but this launch has 4" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_pipeline_ranks_are_outermost_and_share_the_data_of_their_data_parallel_rank():
    """(pp, dp_replicate, dp_shard, sp, tp), pp outermost as torchtitan lays it out: each pipeline part's ranks
    form a whole (dp, sp, tp) block, and the parts of one data-parallel rank read the same rows."""
    layouts = [ParallelLayout(DistEnv(rank, 8, rank, 8), 1, 2, 2, 1, 2) for rank in range(8)]  # pp2 x dp2 x tp2
    assert [(layout.pp_rank, layout.dp_rank) for layout in layouts] == [
        (0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]
    assert layouts[0].describe() == "2 pp x 2 dp_shard x 2 tp"
