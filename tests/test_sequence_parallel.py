"""Ulysses sequence parallelism (parallelism_config sp_size) on 4 gloo ranks against a plain PyTorch loop
written here: every document its own padded row (unpacked, unsplit, one process), the loss summed over the
step's targets and divided by their count, AdamW with clipping. The distributed runs train on packed rows
(DataCollatorWithFlattening: a micro-batch's documents flattened into one row whose position ids restart per
document, of any length, so rows are padded to a multiple of sp) whose sequence is split over the sp ranks:
sp2 x dp_shard2, sp4 and sp2 x tp2 (one query head per rank, so the GQA key/value heads are repeated before
the all-to-all) under FSDP2; instead of packed, rows padded to the micro-batch's longest document on the right
(sp2 x dp_replicate2 under DDP: causality alone hides the padding) and on the left (HSDP 2 x sp2: a mask).
A wrong document boundary, label shift at a slice edge, position id, mask or loss normalisation moves the
losses far beyond 1e-5. Evaluation runs the rows whole;
the sp2 x dp_shard2 checkpoint resumes in one process. Layouts and options sequence parallelism cannot serve
are refused before training, naming them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import VOCAB, losses_of, mean_target_loss, plain_adamw_steps, run_ranks, tiny_llama
from scaletrain import Trainer, TrainingArguments
from scaletrain.errors import NotSupportedError

SEED, STEPS, DOCS, GLOBAL_DOCS, LR, CLIP = 5, 3, 32, 8, 3e-3, 0.5
EVAL_DOCS = 6


class Documents(torch.utils.data.Dataset):
    """Token documents of 5 to 23 tokens."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(5, 24, (n,), generator=g).tolist()
        self.docs = [torch.randint(1, VOCAB, (length,), generator=g).tolist() for length in lengths]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.docs[i], "labels": self.docs[i]}


def model():
    return tiny_llama(seed=SEED, max_position_embeddings=256)


def padded_rows(docs: list[list[int]], left: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(d) for d in docs)
    ids = torch.tensor([[0] * (width - len(d)) + d if left else d + [0] * (width - len(d)) for d in docs])
    mask = torch.tensor([[0] * (width - len(d)) + [1] * len(d) if left else [1] * len(d) + [0] * (width - len(d))
                         for d in docs])
    labels = ids.masked_fill(mask == 0, -100)
    if left:  # a document's first token has no target, as on the right (a pad would predict it here)
        labels[torch.arange(len(docs)), width - torch.tensor([len(d) for d in docs])] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_loop() -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Each step: the next GLOBAL_DOCS documents of the permutation scaletrain documents (seed + epoch)."""
    net, data = model(), Documents(DOCS, seed=1)
    order = torch.randperm(DOCS, generator=torch.Generator().manual_seed(SEED)).tolist()
    steps = [padded_rows([data.docs[i] for i in order[step * GLOBAL_DOCS:(step + 1) * GLOBAL_DOCS]])
             for step in range(STEPS)]
    losses = plain_adamw_steps(net, steps, LR, CLIP)
    net.eval()  # scaletrain's eval_loss: the mean over every target of the evaluation set
    eval_loss = mean_target_loss(net, [padded_rows([d]) for d in Documents(EVAL_DOCS, seed=9).docs])
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}, eval_loss


COLLATORS = {"right": lambda features: padded_rows([f["input_ids"] for f in features]),
             "left": lambda features: padded_rows([f["input_ids"] for f in features], left=True)}


def _trainer(out: str, strategy: str, layout, per_device: int, accumulation: int, rows: str = "packed",
             save_steps: int = 0) -> Trainer:
    from transformers import DataCollatorWithFlattening

    args = TrainingArguments(output_dir=out, strategy=strategy, parallelism_config=layout, max_steps=STEPS,
                             per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                             per_device_eval_batch_size=1, learning_rate=LR, lr_scheduler_type="constant",
                             weight_decay=0.0, optim="adamw_torch", max_grad_norm=CLIP, logging_steps=1,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=SEED,
                             disable_tqdm=True, report_to="none", ddp_timeout=300)
    return Trainer(model=model(), args=args, train_dataset=Documents(DOCS, seed=1),
                   eval_dataset=Documents(EVAL_DOCS, seed=9),
                   data_collator=DataCollatorWithFlattening(return_position_ids=True) if rows == "packed" else
                   COLLATORS[rows])


def _run(out: str, strategy: str, layout: dict, per_device: int, accumulation: int, rows: str = "packed",
         save_steps: int = 0) -> dict:
    trainer = _trainer(out, strategy, layout, per_device, accumulation, rows, save_steps)
    trainer.train()
    return {"losses": losses_of(trainer), "weights": dict(trainer.strategy.full_model_tensors(trainer.model_wrapped)),
            "eval_loss": trainer.evaluate()["eval_loss"], "describe": trainer.strategy.describe()}


def _layouts_job(rank: int, out: str) -> None:
    runs = {  # 8 documents a step: dp ranks x per_device x accumulation
        "fsdp sp2 x dp_shard2": _run(f"{out}/a", "fsdp", {"sp_size": 2, "dp_shard_size": 2}, 2, 2, save_steps=2),
        "fsdp sp4": _run(f"{out}/b", "fsdp", {"sp_size": 4, "dp_shard_size": 1}, 4, 2),
        # rows padded on the right: causality alone keeps the padding out (SDPA's causal kernel, no mask)
        "ddp sp2 x dp_replicate2, right-padded rows": _run(f"{out}/c", "ddp", {"sp_size": 2, "dp_replicate_size": 2},
                                                           4, 1, rows="right"),
        "fsdp sp2 x tp2": _run(f"{out}/d", "fsdp", {"sp_size": 2, "tp_size": 2, "dp_shard_size": 1}, 4, 2),
        # rows padded on the left: the mask keeps padding out of every slice's keys
        "hsdp 2 x sp2, left-padded rows": _run(f"{out}/e", "fsdp", {"sp_size": 2, "dp_replicate_size": 2,
                                                                     "dp_shard_size": 1}, 2, 2, rows="left"),
    }
    if rank == 0:
        torch.save(runs, Path(out, "runs.pt"))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    run_ranks(_layouts_job, str(out), world_size=4, timeout=600)
    return out, torch.load(out / "runs.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference():
    return plain_loop()


@pytest.mark.parametrize("name", ["fsdp sp2 x dp_shard2", "fsdp sp4", "ddp sp2 x dp_replicate2, right-padded rows",
                                  "fsdp sp2 x tp2", "hsdp 2 x sp2, left-padded rows"])
def test_packed_rows_split_over_sp_ranks_train_as_unpacked_rows_in_one_process(layouts, reference, name):
    run = layouts[1][name]
    losses, weights, eval_loss = reference
    assert "sp" in run["describe"]
    torch.testing.assert_close(run["losses"], losses, rtol=0, atol=1e-5)
    initial = model().state_dict()
    assert max((weights[k] - initial[k]).abs().max().item() for k in weights) > 1e-3  # training moved them
    for key, value in weights.items():
        if key in run["weights"]:  # the tied head is saved once
            torch.testing.assert_close(run["weights"][key], value, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert run["eval_loss"] == pytest.approx(eval_loss, abs=1e-5)


def test_a_checkpoint_of_sequence_parallel_ranks_resumes_in_one_process(layouts, reference, tmp_path):
    """FSDP shards the state over dp_shard x sp; the checkpoint reshards to one process, whose last step is the
    plain loop's."""
    losses, weights, _ = reference
    trainer = _trainer(str(tmp_path), "single", None, 4, 2)
    trainer.train(resume_from_checkpoint=str(layouts[0] / "a" / "checkpoint-2"))
    assert losses_of(trainer) == pytest.approx(losses, abs=1e-5)  # the two logged before the checkpoint, and step 3
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("overrides,named", [
    ({"strategy": "zero2", "parallelism_config": {"sp_size": 2}}, "sp_size=2 with strategy 'zero2'"),
    ({"parallelism_config": {"sp_size": 2}, "label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
    ({"parallelism_config": {"sp_size": 2}, "neftune_noise_alpha": 5.0}, "neftune_noise_alpha=5.0"),
    ({"strategy": "fsdp", "parallelism_config": {"cp_size": 2}}, "use sp_size"),
    ({"strategy": "fsdp", "parallelism_config": {"sp_size": 2}, "use_liger_kernel": True}, "use_liger_kernel=True"),
])
def test_options_sequence_parallelism_cannot_serve_are_refused_by_the_arguments(tmp_path, overrides, named):
    with pytest.raises((ValueError, NotSupportedError), match=named):
        TrainingArguments(output_dir=str(tmp_path), **overrides)


def test_the_command_line_refuses_a_model_sequence_parallelism_cannot_split_before_any_process_group(
        monkeypatch, tmp_path, capsys):
    from scaletrain import cli

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it; the check runs before the group starts
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    code = cli.main(["train", "tiny-test", "--output_dir", str(tmp_path), "--strategy", "fsdp",
                     "--parallelism_config", '{"sp_size": 2, "dp_shard_size": 1}'])
    assert code == 2
    assert "sp_size=2: BertForSequenceClassification is not a decoder-only causal LM" in capsys.readouterr().err


@pytest.mark.parametrize("config,sp,block_size,named", [
    ({}, 8, None, "4 attention heads per tensor-parallel rank do not split over sp_size=8"),
    ({"attn_implementation": "flex_attention"}, 2, None, "load the model with attn_implementation='sdpa'"),
    ({}, 4, 30, "data.block_size=30 is not a multiple of parallelism_config sp_size=4: every row would be padded; "
                "use 28 or 32"),
])
def test_models_and_lengths_sequence_parallelism_cannot_split_are_refused_naming_them(config, sp, block_size, named):
    from scaletrain.parallel.sequence_parallel import check_sequence_split

    with pytest.raises(ValueError, match=named):
        check_sequence_split(lambda: tiny_llama(**config), sp, 1, block_size)
