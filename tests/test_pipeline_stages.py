"""Pipeline stages of an HF Llama (scaletrain/parallel/pipeline.py) run by torch's GPipe, 1F1B and
Interleaved1F1B (two stages per rank) schedules on 2 gloo ranks: the loss (summed over the batch's targets,
divided by their count, as LossWeighting normalises) and every parameter's gradient equal one process's full
forward and backward within 1e-5 (tests/test_pipeline.py runs them in the Trainer)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import VOCAB, run_ranks, tiny_llama
from scaletrain.parallel.pipeline import balanced_splits, cut_stages, layer_ranges

ROWS, SEQ, MICRO = 8, 12, 4


def _model():
    return tiny_llama(seed=3, num_hidden_layers=4, tie_word_embeddings=False)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (ROWS, SEQ), generator=g)
    labels = ids.clone()
    labels[::3, :4] = -100  # ragged targets: a micro-batch mean would be wrong
    return ids, labels


def _summed(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def _job(rank: int, out: str, schedule: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    dist.init_process_group("gloo")
    per_rank = 2 if schedule.startswith("Interleaved") else 1  # rank r holds stages r and r + 2
    total = 2 * per_rank
    ranges = layer_ranges(_model(), total)
    indices = [rank + 2 * k for k in range(per_rank)]
    model = _model()
    parts = cut_stages(model, ranges, indices)  # the rank's stages; `model` keeps their parameters, by name
    stages = [PipelineStage(part, i, total, torch.device("cpu")) for part, i in zip(parts, indices, strict=True)]
    ids, labels = _batch()
    count = int((labels[:, 1:] != -100).sum())
    schedule_class = get_schedule_class(schedule)
    sched = schedule_class(stages if per_rank > 1 else stages[0], MICRO,
                           loss_fn=lambda out_, target: _summed(out_, target) / count, scale_grads=False)
    has_last = total - 1 in indices
    losses = [] if has_last else None
    sched.step(*((ids,) if rank == 0 else ()), target=labels if has_last else None, losses=losses)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "loss": float(sum(losses)) if losses else None},
               Path(out, f"{schedule}-{rank}.pt"))
    dist.destroy_process_group()


def test_balanced_splits_minimise_the_largest_stage():
    assert balanced_splits([10, 1, 1, 1, 1, 10], 2) == [0, 3]
    assert balanced_splits([5, 5, 5, 5], 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot form 5 pipeline stages"):
        balanced_splits([1, 2], 5)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B"])
def test_two_stages_give_one_process_loss_and_gradients(tmp_path, schedule):
    run_ranks(_job, str(tmp_path), schedule, world_size=2, timeout=240)
    model = _model()
    ids, labels = _batch()
    count = int((labels[:, 1:] != -100).sum())
    loss = _summed(model(input_ids=ids).logits, labels) / count
    loss.backward()
    parts = [torch.load(tmp_path / f"{schedule}-{rank}.pt", weights_only=False) for rank in (0, 1)]
    last = next(part for part in parts if part["loss"] is not None)  # the rank holding the last stage
    assert last["loss"] == pytest.approx(loss.item(), abs=1e-5)
    grads = {**parts[0]["grads"], **parts[1]["grads"]}
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert set(grads) == set(expected)  # every parameter on exactly one stage, under its own name
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
