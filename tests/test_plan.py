"""`scaletrain plan`: the layouts it enumerates, its memory model against memory measured on 4 gloo ranks
(every layout, within 15%), its communication model against ring formulas written here, and the command
line's refusals (exit 2, naming the value)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_ranks, tiny_llama
from scaletrain import cli
from scaletrain.performance.plan import Hardware, Layout, PlanShape, layouts, plan, predict, predict_memory

PROJECT = Path(__file__).resolve().parents[1]
GiB = 2**30


def _hardware(gpus: int, per_node: int, memory: float = 80 * GiB) -> Hardware:
    return Hardware(gpus=gpus, gpus_per_node=per_node, memory=memory, peak_tflops=1000.0, efficiency=0.5,
                    intra_node_gbps=400.0, inter_node_gbps=40.0)


def _split_and_whole(model: torch.nn.Module) -> tuple[int, int]:
    """Parameters in Llama's projection layers (its HF plan splits them) and in everything else."""
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    split = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[-2] in projections)
    return split, sum(p.numel() for p in model.parameters()) - split


def test_every_mesh_the_strategies_run_is_enumerated_once_per_micro_batch_choice():
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=2)  # tp may be 1 or 2: it must divide 2 kv heads
    shape = PlanShape.of(model, range(1, 5))
    assert shape.tp_sizes == (1, 2)
    found = list(layouts(shape, _hardware(16, 4), global_batch=64))
    meshes = {(lay.dp_replicate, lay.dp_shard, lay.tp) for lay in found}
    expected = {(16 // tp // shard, shard, tp) for tp in (1, 2) for shard in (1, 2, 4, 8, 16) if 16 // tp % shard == 0}
    assert meshes == expected
    for lay in found:
        assert lay.micro_batch * lay.accumulation * lay.dp_replicate * lay.dp_shard == 64
    assert {lay.checkpointing for lay in found} == {False, True}
    assert {lay.strategy for lay in found} == {"ddp", "fsdp"}


def test_the_state_per_gpu_counts_split_layers_once_per_tp_rank_and_whole_ones_on_every_rank():
    model = tiny_llama(tie_word_embeddings=False)
    split, whole = _split_and_whole(model)
    shape = PlanShape.of(model, range(1, 3))
    assert shape.tp_split == split
    for dp_replicate, dp_shard, tp, accumulation in ((1, 4, 2, 1), (2, 2, 1, 1), (2, 1, 2, 1), (1, 4, 2, 3)):
        memory = predict_memory(shape, Layout(dp_replicate, dp_shard, tp, 2, accumulation, False), "bf16", 64)
        held = split / tp + whole
        assert memory["parameters"] == pytest.approx(4 * held / dp_shard)  # fp32 parameters under bf16 autocast
        assert memory["optimizer"] == pytest.approx(8 * held / dp_shard)  # AdamW's two fp32 moments
        # FSDP's no-sync window keeps whole gradients until the last micro-batch reduce-scatters them
        whole_gradients = dp_shard > 1 and accumulation > 1
        assert memory["gradients"] == pytest.approx(4 * held / (1 if whole_gradients else dp_shard))


def test_communication_follows_ring_collectives_over_the_links_each_group_spans():
    model = tiny_llama(num_hidden_layers=4)
    shape = PlanShape.of(model, range(1, 9))
    params = sum(p.numel() for p in model.parameters())
    hw = _hardware(16, 8)
    ddp = predict(shape, Layout(16, 1, 1, 4, 1, False), hw, "bf16", 128, 64)
    # DDP: one all-reduce of the fp32 gradients across the two nodes: 2 x 4 bytes x (n-1)/n at 40 GB/s
    assert ddp.seconds["data_parallel"] == pytest.approx(2 * 4 * params * 15 / 16 / 40e9)
    hsdp = predict(shape, Layout(2, 8, 1, 2, 2, False), hw, "bf16", 128, 64)
    # HSDP: per micro-batch two bf16 all-gathers inside the node, one fp32 reduce-scatter per step, then an
    # all-reduce of the 1/8 shard across the nodes
    inside = (2 * 2 * 2 * params + 4 * params) * 7 / 8 / 400e9
    across = 2 * 4 * params / 8 * 1 / 2 / 40e9
    assert hsdp.seconds["data_parallel"] == pytest.approx(inside + across)
    assert ddp.seconds["tensor_parallel"] == hsdp.seconds["tensor_parallel"] == 0
    tp = predict(shape, Layout(1, 8, 2, 4, 1, False), hw, "bf16", 128, 64)
    # four all-reduces of the micro-batch's bf16 activations per layer, inside the node
    assert tp.seconds["tensor_parallel"] == pytest.approx(4 * 4 * 2 * (2 * 4 * 128 * 32) * 1 / 2 / 400e9)
    checkpointed = predict(shape, Layout(16, 1, 1, 4, 1, True), hw, "bf16", 128, 64)
    assert checkpointed.seconds["compute"] == pytest.approx(ddp.seconds["compute"] * 4 / 3)
    assert checkpointed.memory["activations"] < ddp.memory["activations"]


def test_pipeline_layouts_hold_the_fullest_stage_the_trainer_cuts_and_pay_the_bubble():
    from copy import deepcopy

    from scaletrain.parallel.pipeline import cut_stages, layer_ranges

    model = tiny_llama(num_hidden_layers=4, tie_word_embeddings=False)
    shape = PlanShape.of(model, range(1, 3))
    assert not PlanShape.of(tiny_llama(num_hidden_layers=4), range(1, 3)).pipeline_units  # tied: no stages
    # what a pipeline rank really holds: the model pruned to its stage, as the Trainer cuts it
    def fullest_stage(split_points) -> int:
        held = []
        for stage in range(2):
            part = deepcopy(model)
            cut_stages(part, layer_ranges(model, 2, split_points), [stage])
            held.append(sum(p.numel() for p in part.parameters()))
        return max(held)

    hw = _hardware(16, 8)
    pipelined = predict(shape, Layout(1, 8, 1, 2, 4, False, pp=2), hw, "bf16", 128, 64)
    assert pipelined.layout.strategy == "fsdp"
    assert pipelined.memory["parameters"] == pytest.approx(4 * fullest_stage(None) / 8)
    # the user's split points (stage 2 from layer 1: three layers and the head on it), as `estimate` passes them
    split = predict_memory(shape, Layout(1, 8, 1, 2, 4, False, pp=2, split_points=(1,)), "bf16", 128)
    assert split["parameters"] == pytest.approx(4 * fullest_stage([1]) / 8)
    assert split["parameters"] > pipelined.memory["parameters"]
    # the same work on 16 GPUs, idle for (pp - 1) of (m + pp - 1) micro-batch slots
    flat = predict(shape, Layout(1, 16, 1, 1, 4, False), hw, "bf16", 128, 64)
    assert pipelined.seconds["compute"] == pytest.approx(flat.seconds["compute"] * (4 + 1) / 4)
    # each micro-batch's bf16 hidden states forward and their gradients back, across the nodes (pp outermost)
    assert pipelined.seconds["pipeline"] == pytest.approx(4 * 2 * (2 * 2 * 128 * 32) / 40e9)
    found = list(layouts(shape, hw, 64))
    assert {lay.pp for lay in found} == {1, 2, 4}  # 4 layers: at most 4 stages
    assert all(lay.accumulation >= lay.pp and lay.strategy == "fsdp" for lay in found if lay.pp > 1)
    assert Layout(1, 8, 1, 2, 4, False, pp=2).parallelism_config() == {
        "dp_replicate_size": 1, "dp_shard_size": 8, "tp_size": 1, "pp_size": 2, "pp_schedule": "1F1B"}


def test_pipeline_schedules_hold_the_micro_batches_they_keep_in_flight():
    shape = PlanShape.of(tiny_llama(num_hidden_layers=4, tie_word_embeddings=False), range(1, 2))

    def activations(schedule: str, micro_batches: int, stages_per_rank: int = 1) -> float:
        layout = Layout(1, 2, 1, 2, micro_batches, False, pp=2, schedule=schedule, stages_per_rank=stages_per_rank)
        return predict_memory(shape, layout, "fp32", 64)["activations"]

    # 1F1B: at most pp micro-batches in flight, however many the step has; GPipe: every one, each the same more
    assert activations("1F1B", 4) == activations("1F1B", 8) < activations("GPipe", 4)
    assert activations("GPipe", 8) - activations("GPipe", 6) == pytest.approx(
        activations("GPipe", 6) - activations("GPipe", 4))
    # interleaving keeps (p - 1)/(p v) more of them
    assert activations("1F1B", 8) < activations("Interleaved1F1B", 8, 2) < activations("GPipe", 8)
    assert Layout(1, 2, 1, 2, 8, False, pp=2, schedule="Interleaved1F1B", stages_per_rank=2).bubble \
        == pytest.approx(1 / (2 * 8 + 1))


def test_tensor_parallel_groups_stay_inside_nodes_and_groups_across_nodes_get_the_slow_links():
    shape = PlanShape(PlanShape.of(tiny_llama(), range(1, 2)).model, 0, (1, 3))  # a model tp=3 could split
    eight, six = _hardware(24, 8), _hardware(24, 6)
    # 3 does not divide 8: ranks 6, 7, 8 would form a tp group across two nodes
    assert {lay.tp for lay in layouts(shape, eight, 48)} == {1}
    assert {lay.tp for lay in layouts(shape, six, 48)} == {1, 3}
    assert eight.bandwidth(3) == 40e9 and six.bandwidth(3) == 400e9 and eight.bandwidth(24) == 40e9
    assert _hardware(4, 8).bandwidth(3) == 400e9  # one node: every group is inside it


def test_the_fastest_layout_that_fits_comes_first_and_layouts_that_do_not_fit_are_set_apart():
    shape = PlanShape.of(tiny_llama(num_hidden_layers=4), range(1, 9))
    hw = _hardware(16, 8)
    fits, too_big = plan(shape, hw, "bf16", 128, 64)
    assert fits and not too_big
    times = [p.step_seconds for p in fits]
    assert times == sorted(times)
    # HSDP inside the nodes beats flat FSDP across them, which all-gathers over the slow links every micro-batch
    first = fits[0].layout
    assert first.dp_shard * first.tp <= 8
    smallest = min(p.total_memory for p in fits)
    fits, too_big = plan(shape, _hardware(16, 8, memory=smallest * 1.01), "bf16", 128, 64)
    assert all(p.total_memory <= smallest * 1.01 for p in fits)
    assert too_big and all(p.total_memory > smallest * 1.01 for p in too_big)


# ---------------------------------------------------------------- measured on 4 ranks

SEQ, VOCAB, MICRO = 256, 8192, 4
# name -> strategy, (dp_replicate, dp_shard, tp, sp), activation checkpointing, precision
MEASURED_LAYOUTS = {"fsdp 4": ("fsdp", (1, 4, 1, 1), False, "fp32"),
                    "hsdp 2x2": ("fsdp", (2, 2, 1, 1), False, "fp32"),
                    "tp2 x fsdp2": ("fsdp", (1, 2, 2, 1), False, "fp32"),
                    "ddp 4": ("ddp", (4, 1, 1, 1), False, "fp32"),
                    "tp2 x ddp2": ("ddp", (2, 1, 2, 1), False, "fp32"),
                    "tp2 x fsdp2 checkpointed": ("fsdp", (1, 2, 2, 1), True, "fp32"),
                    "ddp 4 bf16 autocast": ("ddp", (4, 1, 1, 1), False, "bf16"),
                    "sp2 x fsdp2": ("fsdp", (1, 2, 1, 2), False, "fp32"),
                    "sp4 fsdp": ("fsdp", (1, 1, 1, 4), False, "fp32"),
                    "sp2 x ddp2": ("ddp", (2, 1, 1, 2), False, "fp32"),
                    "sp2 x fsdp2 checkpointed": ("fsdp", (1, 2, 1, 2), True, "fp32")}


def measured_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=SEQ))


def _full_rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def _measure_job(rank: int, out: str) -> None:
    from scaletrain import Trainer, TrainingArguments

    peaks = {}
    for name, (strategy, (dp_replicate, dp_shard, tp, sp), checkpointing, precision) in MEASURED_LAYOUTS.items():
        layout = {"dp_replicate_size": dp_replicate, "dp_shard_size": dp_shard, "tp_size": tp, "sp_size": sp}
        args = TrainingArguments(output_dir=f"{out}/{rank}", per_device_train_batch_size=MICRO, max_steps=1,
                                 optim="adamw_torch", report_to="none", disable_tqdm=True, save_strategy="no",
                                 strategy=strategy, parallelism_config=layout, ddp_timeout=300,
                                 activation_checkpointing=checkpointing, bf16=precision == "bf16")
        trainer = Trainer(model=measured_model(), args=args, train_dataset=_full_rows(8))
        trainer._setup_model()
        peaks[name] = trainer.measure_step_memory(MICRO)
    if rank == 0:
        Path(out, "peaks.json").write_text(json.dumps(peaks))


@pytest.mark.slow
def test_the_memory_model_is_within_15_percent_of_every_layout_measured_on_4_ranks(tmp_path):
    run_ranks(_measure_job, str(tmp_path), world_size=4, timeout=600)
    measured = json.loads((tmp_path / "peaks.json").read_text())
    shape = PlanShape.of(measured_model(), range(1, 3))
    for name, (strategy, (dp_replicate, dp_shard, tp, sp), checkpointing, precision) in MEASURED_LAYOUTS.items():
        layout = Layout(dp_replicate, dp_shard, tp, MICRO, 1, checkpointing, sp, sharded=strategy == "fsdp")
        predicted = sum(predict_memory(shape, layout, precision, SEQ).values())
        assert abs(predicted / measured[name] - 1) < 0.15, (name, predicted / 2**20, measured[name] / 2**20)


# ---------------------------------------------------------------- the command line

def _plan_config(tmp_path, lora: bool = False) -> str:
    config = tmp_path / "plan.yaml"
    config.write_text("model:\n  name_or_path: smollm2\ndata:\n  dataset: moviedialog\n  max_length: 2048\n"
                      f"training:\n  output_dir: {tmp_path}/out\n  per_device_train_batch_size: 4\n  bf16: true\n"
                      + ("  lora:\n    r: 8\n" if lora else ""))
    return str(config)


def test_plan_prints_the_best_layouts_of_a_real_model_with_commands_that_run_them(tmp_path, capsys):
    # SmolLM2-135M: 9 attention heads and 3 key/value heads, so tensor parallelism can only be 3 (or 1)
    assert cli.main(["plan", _plan_config(tmp_path), "--gpus", "24", "--gpus-per-node", "6", "--global-batch", "96",
                     "--top", "30", "--seq-len", "1024", "--learning_rate", "3e-5"]) == 0
    out = capsys.readouterr().out
    assert "tp sizes it allows: 1, 3" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    commands = [line for line in out.splitlines() if "launch/torchrun.sh" in line]
    assert len(rows) == len(commands) > 1
    assert any("3 tp" in row for row in rows) and not any("2 tp" in row or "4 tp" in row for row in rows)
    for command in commands:
        sizes = json.loads(command.split("--parallelism_config '")[1].split("'")[0])
        assert sizes["dp_replicate_size"] * sizes["dp_shard_size"] * sizes["tp_size"] == 24
        assert "NNODES=4" in command and "NPROC=6" in command
        # what the plan was made for: the overrides and the planned sequence length travel with the command,
        # and checkpointing is stated either way (the config's own setting must not override the plan's)
        assert "--learning_rate 3e-5 --data.max_length 1024 " in command
        assert command.endswith(("--activation_checkpointing true", "--activation_checkpointing false"))


@pytest.mark.parametrize("extra,message", [
    ([], "--gpus N is required"),
    (["--gpus", "12"], "not a whole number of nodes"),
    (["--gpus", "8", "--global-batch", "7"], "--global-batch 7 cannot be divided"),
    (["--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory='lots' is not a memory size"),
    (["--gpus", "8", "--efficiency", "2"], "--efficiency 2.0"),
    (["--gpus", "eight"], "--gpus 'eight' is not an integer"),
])
def test_plan_refuses_bad_options_naming_them(tmp_path, capsys, extra, message):
    assert cli.main(["plan", _plan_config(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_plan_refuses_a_lora_config_rather_than_planning_the_wrong_optimizer_state(tmp_path, capsys):
    assert cli.main(["plan", _plan_config(tmp_path, lora=True), "--gpus", "8"]) == 2
    assert "drop training.lora" in capsys.readouterr().err


def test_no_layout_fitting_is_said_and_the_smallest_are_shown(tmp_path, capsys):
    assert cli.main(["plan", _plan_config(tmp_path), "--gpus", "8", "--gpu-memory", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "no layout fits in 100.0 MiB per GPU" in out and "launch/torchrun.sh" in out


def test_estimate_predicts_the_configured_layout_per_rank(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from scaletrain.performance.memory import format_bytes
    from scaletrain.tasks.base import smollm2_path

    assert cli.main(["estimate", _plan_config(tmp_path), "--world-size", "6", "--strategy", "fsdp",
                     "--parallelism_config", '{"tp_size": 3, "dp_shard_size": -1}']) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("parallelism_config on 6 ranks"))
    assert "(2 dp_shard x 3 tp, fsdp)" in line
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path()))
    split, whole = _split_and_whole(model)
    assert f"parameters {format_bytes(4 * (split / 3 + whole) / 2)}," in line


def test_the_documented_8b_plan_runs_and_shows_what_the_memory_guide_says(capsys, monkeypatch):
    monkeypatch.chdir(PROJECT)
    assert cli.main(["plan", "docs/examples/causal-lm.yaml", "--model.name_or_path",
                     "docs/examples/models/llama-3.1-8b", "--bf16", "true", "--gpus", "16", "--gpus-per-node", "8",
                     "--gpu-memory", "80GiB", "--seq-len", "8192", "--global-batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 trainable parameters" in out  # Llama-3.1-8B
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    guide = (PROJECT / "docs" / "guides" / "memory.md").read_text()
    assert rows and all(row in guide for row in rows)
