"""Pipeline parallelism (parallelism_config pp_size) in the Trainer, on gloo ranks, against a plain PyTorch
loop written here: one process, every step's documents in one right-padded batch, the loss summed over the
step's targets and divided by their count, AdamW with clipping. Pipelined runs split each step into
gradient-accumulation micro-batches that the schedule runs as its own (GPipe, 1F1B, Interleaved1F1B with two
stages per rank; pp2 x dp_shard2 under FSDP2 on 4 ranks). A wrong loss normalisation over micro-batches or
stages, a gradient synced twice or not at all, or a clipping norm taken over one stage only moves the losses
or weights far beyond 1e-5. The pp2 checkpoint resumes in one process (no pipeline) to the loop's last step,
its model folder opens with from_pretrained, and evaluation runs through a forward-only schedule."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

from helpers import VOCAB, losses_of, mean_target_loss, plain_adamw_steps, run_ranks, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.errors import NotSupportedError

SEED, STEPS, DOCS, GLOBAL_DOCS, LR, CLIP = 5, 3, 32, 8, 3e-3, 0.5
EVAL_DOCS = 6
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


class Documents(torch.utils.data.Dataset):
    """Token documents of 5 to 47 tokens: micro-batches pad to 32 or 64, so data-parallel ranks reading
    different rows must agree on one shape; `labelled=False` leaves the labels out (predict)."""

    def __init__(self, n: int, seed: int, labelled: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(5, 48, (n,), generator=g).tolist()
        self.docs = [torch.randint(1, VOCAB, (length,), generator=g).tolist() for length in lengths]
        self.labelled = labelled

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.docs[i], **({"labels": self.docs[i]} if self.labelled else {})}


def model():
    # four layers: four stages for the interleaved schedule; untied, as the head lives on the last stage
    return tiny_llama(seed=SEED, num_hidden_layers=4, tie_word_embeddings=False, max_position_embeddings=256)


def padded_rows(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded to a multiple of 32 tokens, as pipeline stages pad a step: the padding changes no result,
    but the matmuls' shapes and so their rounding, which Adam's first steps magnify in near-zero gradients."""
    width = -(-max(len(d) for d in docs) // 32) * 32
    ids = torch.tensor([d + [0] * (width - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in docs])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    rows = padded_rows([f["input_ids"] for f in features])
    return rows if "labels" in features[0] else {k: v for k, v in rows.items() if k != "labels"}


def plain_loop() -> tuple[list[float], dict[str, torch.Tensor], float, list[torch.Tensor]]:
    """Each step: the next GLOBAL_DOCS documents of the permutation scaletrain draws (seed + epoch)."""
    net, data = model(), Documents(DOCS, seed=1)
    order = torch.randperm(DOCS, generator=torch.Generator().manual_seed(SEED)).tolist()
    steps = [padded_rows([data.docs[i] for i in order[step * GLOBAL_DOCS:(step + 1) * GLOBAL_DOCS]])
             for step in range(STEPS)]
    losses = plain_adamw_steps(net, steps, LR, CLIP)
    net.eval()  # eval_loss: the mean over every target of the evaluation set, one document a batch
    docs = Documents(EVAL_DOCS, seed=9).docs
    eval_loss = mean_target_loss(net, [padded_rows([d]) for d in docs])
    with torch.no_grad():
        logits = [net(input_ids=torch.tensor([d])).logits[0] for d in docs]
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}, eval_loss, logits


def _args(out: str, layout: dict, per_device: int, accumulation: int, save_steps: int = 0, **extra):
    settings = dict(output_dir=out, parallelism_config=layout, max_steps=STEPS, per_device_train_batch_size=per_device,
                    gradient_accumulation_steps=accumulation, per_device_eval_batch_size=1, learning_rate=LR,
                    lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", max_grad_norm=CLIP,
                    logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                    seed=SEED, disable_tqdm=True, report_to="none", ddp_timeout=300)
    return TrainingArguments(**{**settings, **extra})


def _run(out: str, layout: Optional[dict], per_device: int, accumulation: int, save_steps: int = 0, **extra) -> dict:
    trainer = Trainer(model=model(), args=_args(out, layout, per_device, accumulation, save_steps, **extra),
                      train_dataset=Documents(DOCS, seed=1), eval_dataset=Documents(EVAL_DOCS, seed=9),
                      data_collator=collate)
    trainer.train()
    trainer.save_model(f"{out}/final")
    return {"losses": losses_of(trainer), "weights": dict(trainer.strategy.full_model_tensors(trainer.model_wrapped)),
            "eval_loss": trainer.evaluate()["eval_loss"], "describe": trainer.strategy.describe(),
            "logits": trainer.predict(Documents(EVAL_DOCS, seed=9, labelled=False)).predictions}


def _two_ranks_job(rank: int, out: str, whole_model_checkpoint: str) -> None:
    one_f_one_b = {"pp_size": 2, "pp_schedule": "1F1B"}
    runs = {  # 8 documents a step: 2 rows x 4 micro-batches
        "GPipe": _run(f"{out}/gpipe", {"pp_size": 2, "pp_schedule": "GPipe"}, 2, 4, save_steps=2),
        "1F1B": _run(f"{out}/1f1b", one_f_one_b, 2, 4),
        "Interleaved1F1B": _run(f"{out}/interleaved", {"pp_size": 2, "pp_schedule": "Interleaved1F1B"}, 2, 4),
        "1F1B checkpointed": _run(f"{out}/ckpt", one_f_one_b, 2, 4, activation_checkpointing=True),
        "1F1B bf16": _run(f"{out}/bf16", one_f_one_b, 2, 4, bf16=True),
        "1F1B LoRA": _run(f"{out}/lora", one_f_one_b, 2, 4, save_steps=2, lora=LORA),
        "override": _refused_override(),
        "whole-model resume": _refused_resume(whole_model_checkpoint),
    }
    if rank == 0:
        torch.save(runs, Path(out, "runs.pt"))


def _refused_resume(checkpoint: str) -> str:
    from scaletrain.checkpoint import CheckpointError

    trainer = Trainer(model=model(), args=_args("unused", {"pp_size": 2}, 2, 4), train_dataset=Documents(8, seed=1),
                      data_collator=collate)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except CheckpointError as error:
        return str(error)
    return "not refused"


class LossOverride(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _refused_override() -> str:
    try:
        LossOverride(model=model(), args=_args("unused", {"pp_size": 2}, 2, 4), train_dataset=Documents(8, seed=1),
                     data_collator=collate)
    except NotSupportedError as error:
        return str(error)
    return "not refused"


def _four_ranks_job(rank: int, out: str) -> None:
    runs = {"pp2 x dp_shard2": _run(f"{out}/pp_dp", {"pp_size": 2, "dp_shard_size": 2}, 2, 2),
            "pp2 x dp_replicate2": _run(f"{out}/pp_hsdp", {"pp_size": 2, "dp_replicate_size": 2, "dp_shard_size": 1},
                                        2, 2),
            "pp2 x tp2": _run(f"{out}/pp_tp", {"pp_size": 2, "tp_size": 2, "dp_shard_size": 1}, 2, 4)}
    if rank == 0:
        torch.save(runs, Path(out, "runs.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2")
    # a one-process checkpoint: whole-model HF files, which pipeline stages refuse to resume from
    Trainer(model=model(), args=_args(f"{out}/single", None, 8, 1, save_steps=1, strategy="single", max_steps=1),
            train_dataset=Documents(DOCS, seed=1), data_collator=collate).train()
    run_ranks(_two_ranks_job, str(out), f"{out}/single/checkpoint-1", world_size=2, timeout=600)
    return out, torch.load(out / "runs.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference():
    return plain_loop()


def _assert_trains_as(run: dict, losses: list[float], weights: dict[str, torch.Tensor], eval_loss: float,
                      logits: list[torch.Tensor], weights_atol: float = 1e-5) -> None:
    torch.testing.assert_close(run["losses"], losses, rtol=0, atol=1e-5)
    assert run["weights"].keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(run["weights"][name], tensor, rtol=0, atol=weights_atol, msg=name)
    assert run["eval_loss"] == pytest.approx(eval_loss, abs=1e-5)
    # predict() without labels: every document's logits, in dataset order (the collator pads each to a multiple
    # of 32, and the evaluation loop pads them to the longest)
    predictions = torch.as_tensor(run["logits"])
    assert predictions.shape == (len(logits), -(-max(len(x) for x in logits) // 32) * 32, VOCAB)
    for row, expected in zip(predictions, logits, strict=True):
        torch.testing.assert_close(row[:len(expected)], expected, rtol=0, atol=10 * weights_atol)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B", "1F1B checkpointed"])
def test_pipeline_schedules_train_as_one_process(two_ranks, reference, schedule):
    run = two_ranks[1][schedule]
    assert "pp" in run["describe"] and schedule.split()[0] in run["describe"]
    _assert_trains_as(run, *reference)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2x2")
    run_ranks(_four_ranks_job, str(out), world_size=4, timeout=600)
    return torch.load(out / "runs.pt", weights_only=False)


@pytest.mark.parametrize("name", ["pp2 x dp_shard2", "pp2 x dp_replicate2", "pp2 x tp2"])
def test_pipeline_with_data_or_tensor_parallel_stages_trains_as_one_process(four_ranks, reference, name):
    run = four_ranks[name]
    for size in ("pp", "dp_shard", "dp_replicate", "tp"):
        assert (f"2 {size}" in run["describe"]) == (f"{size}2" in name)
    # tp's row-wise layers sum their contraction in two parts, and Adam's first steps turn that rounding in
    # near-zero gradients into weight differences of about 1e-5 (measured: 1.3e-5 at most, in one tensor)
    _assert_trains_as(run, *reference, weights_atol=1e-5 if "tp" not in name else 3e-5)


def test_a_loss_override_the_pipeline_would_bypass_is_refused(two_ranks):
    assert "LossOverride overrides compute_loss, and parallelism_config pp_size=2" in two_ranks[1]["override"]


def test_pipeline_adapters_train_as_one_process(two_ranks, tmp_path):
    """LoRA on pipeline stages against the same LoRA run in one process (no pipeline, one batch a step)."""
    from safetensors.torch import load_file

    single = _run(str(tmp_path), None, 8, 1, save_steps=2, lora=LORA, strategy="single")
    run = two_ranks[1]["1F1B LoRA"]
    torch.testing.assert_close(run["losses"], single["losses"], rtol=0, atol=1e-5)
    assert run["weights"].keys() == single["weights"].keys()
    for name, tensor in single["weights"].items():
        torch.testing.assert_close(run["weights"][name], tensor, rtol=0, atol=1e-5, msg=name)
    # the checkpoint's adapter file holds every stage's adapters, as the one-process run's does
    saved = load_file(two_ranks[0] / "lora" / "checkpoint-2" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_a_whole_model_checkpoint_is_refused_under_pipeline_stages_naming_the_way_round(two_ranks):
    refusal = two_ranks[1]["whole-model resume"]
    assert "holds whole-model HF files (saved by strategy single)" in refusal
    assert "resume it once with strategy fsdp without pp_size" in refusal


def test_pipeline_in_bf16_computes_in_bf16(two_ranks, reference):
    """FSDP2's bf16 policy on the stages: the losses are fp32's to bf16 precision, and not fp32's."""
    losses = two_ranks[1]["1F1B bf16"]["losses"]
    torch.testing.assert_close(losses, reference[0], rtol=0, atol=3e-2)
    assert max(abs(a - b) for a, b in zip(losses, reference[0], strict=True)) > 1e-4


def test_pipeline_checkpoint_resumes_in_one_process(two_ranks, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = two_ranks
    checkpoint = Path(out, "gpipe", "checkpoint-2")
    losses, weights, _, _ = reference
    # the checkpoint folder and save_model's are whole HF models, although each rank held half of it
    saved = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert saved.keys() == weights.keys()
    final = AutoModelForCausalLM.from_pretrained(Path(out, "gpipe", "final")).state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5, msg=name)
    resumed = Trainer(model=model(), args=_args(str(tmp_path), None, 8, 1), train_dataset=Documents(DOCS, seed=1),
                      data_collator=collate)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.strategy.layout.pp == 1
    # steps 1-2 logged by the pipeline (restored with the state), step 3 trained here
    torch.testing.assert_close(losses_of(resumed), losses, rtol=0, atol=1e-5)
    assert resumed.state.log_history[-2]["step"] == 3
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("overrides,named", [
    ({"parallelism_config": {"pp_size": 2, "sp_size": 2}}, "sp_size=2 with pp_size=2"),
    ({"parallelism_config": {"pp_size": 2}, "gradient_accumulation_steps": 4, "fp16": True}, "fp16=True"),
    ({"parallelism_config": {"pp_size": 2, "pp_microbatches": 8}, "gradient_accumulation_steps": 4},
     "pp_microbatches=8 with gradient_accumulation_steps=4: a step's micro-batches are the pipeline's"),
    ({"parallelism_config": {"pp_size": 2, "pp_schedule": "Interleaved1F1B"}, "gradient_accumulation_steps": 5},
     "equal rounds of about 2, which gradient_accumulation_steps=5 cannot form"),
    ({"parallelism_config": {"pp_size": 2, "pp_schedule": "ZeroBubble"}}, "pp_schedule='ZeroBubble'"),
    ({"parallelism_config": {"pp_size": 2, "pp_schedule": "GPipe", "pp_stages_per_rank": 2}},
     "GPipe and 1F1B run 1 stage per rank"),
    ({"parallelism_config": {"pp_size": 2, "pp_schedule": "GPipe"}, "strategy": "zero3"}, "pp_size=2 with strategy"),
    ({"parallelism_config": {"pp_size": 2, "pp_schedule": "GPipe"}, "auto_find_batch_size": True},
     "auto_find_batch_size=True"),
    ({"parallelism_config": {"pp_schedule": "GPipe"}}, "pp_schedule='GPipe' without pipeline stages"),
])
def test_options_pipeline_stages_cannot_serve_are_refused_by_the_arguments(tmp_path, overrides, named):
    with pytest.raises((ValueError, NotSupportedError), match=named):
        TrainingArguments(output_dir=str(tmp_path), **overrides)


def test_generation_is_refused_with_pipeline_stages(tmp_path):
    from scaletrain import Seq2SeqTrainingArguments

    with pytest.raises(NotSupportedError, match="predict_with_generate=True .* generation runs the whole model"):
        Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True,
                                 parallelism_config={"pp_size": 2, "pp_schedule": "GPipe"})


@pytest.mark.parametrize("config,stages,points,named", [
    ({}, 2, None, "tied input and output embeddings"),
    ({"tie_word_embeddings": False}, 5, None, "4 decoder layers cannot give each of 5 pipeline stages one"),
    ({"tie_word_embeddings": False}, 2, [4], r"pp_split_points=\[4\] must be 1 increasing layer indices above 0 "
                                             r"and below 4"),
])
def test_models_pipeline_stages_cannot_split_are_refused_naming_them(config, stages, points, named):
    from scaletrain.parallel.pipeline import check_pipeline_split

    with torch.device("meta"):
        net = tiny_llama(**{"num_hidden_layers": 4, **config})
    with pytest.raises(ValueError, match=named):
        check_pipeline_split(net, stages, points)


def test_the_command_line_refuses_a_model_pipeline_stages_cannot_split_before_any_process_group(
        monkeypatch, tmp_path, capsys):
    from scaletrain import cli

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it; the check runs before the group starts
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    code = cli.main(["train", "tiny-test", "--output_dir", str(tmp_path), "--parallelism_config",
                     '{"pp_size": 2, "pp_schedule": "GPipe"}'])
    assert code == 2
    assert "pp_size: BertForSequenceClassification is not a decoder-only causal LM" in capsys.readouterr().err


def test_overrides_are_judged_by_the_class_that_defines_them():
    """Seq2SeqTrainer's prediction_step is the Trainer's without generation (which pp refuses): it runs under pp;
    a subclass's own prediction_step would bypass the stages' forward-only schedule and is refused."""
    from scaletrain import Seq2SeqTrainer
    from scaletrain.parallel.environment import DistEnv
    from scaletrain.parallel.layout import ParallelLayout
    from scaletrain.trainer.trainer import _refuse_overrides_the_layout_bypasses

    class OwnPrediction(Seq2SeqTrainer):
        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)

    pipeline = ParallelLayout(DistEnv(0, 2, 0, 2), dp_replicate=1, dp_shard=1, tp=1, pp=2)
    _refuse_overrides_the_layout_bypasses(Seq2SeqTrainer, pipeline)
    with pytest.raises(NotSupportedError, match="OwnPrediction overrides prediction_step, and parallelism_config"):
        _refuse_overrides_the_layout_bypasses(OwnPrediction, pipeline)
