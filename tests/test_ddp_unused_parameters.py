"""DDP without the needless autograd traversal: when ddp_find_unused_parameters is unset, the first step
finds out whether any trainable parameter gets no gradient (on any rank) and keeps DDP's search only
then. Checked on 2 gloo ranks against DDP run with the search on (HF's default, the reference): the same
losses and weights, for a model that uses every parameter (the search is dropped) and for one with a
parameter unused everywhere and another used on one rank only (the search is kept)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import RaggedLM, losses_of, run_ranks, tiny_gpt2
from scaletrain import Trainer, TrainingArguments

STEPS = 6


class UnevenUse(torch.nn.Module):
    """A tiny LM whose `extra` layer adds to the loss on rank 0 only and whose `never` layer is unused:
    without DDP's search the first would stall the reduction, the second too on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_gpt2()
        torch.manual_seed(1)
        self.extra, self.never = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = out.loss
        if torch.distributed.get_rank() == 0:
            loss = loss + 1e-2 * self.extra.weight.pow(2).sum()
        return {"loss": loss, "logits": out.logits}


def _train(make_model, out: str, **ddp) -> dict:
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=STEPS, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, report_to="none", seed=0, strategy="ddp", **ddp)
    model = make_model()
    trainer = Trainer(model=model, args=args, train_dataset=RaggedLM(48))
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"losses": losses_of(trainer), "searches": trainer.model_wrapped.find_unused_parameters,
            "weights": weights}


def _job(rank: int, out: str) -> None:
    results = {
        "uses_all/auto": _train(tiny_gpt2, f"{out}/a"),
        "uses_all/search": _train(tiny_gpt2, f"{out}/b", ddp_find_unused_parameters=True),
        "uneven/auto": _train(UnevenUse, f"{out}/c"),
        "uneven/search": _train(UnevenUse, f"{out}/d", ddp_find_unused_parameters=True),
    }
    initial_never = UnevenUse().never.weight.detach().clone()
    if rank == 0:
        torch.save({name: r.pop("weights") for name, r in results.items()}, Path(out, "weights.pt"))
        torch.save(initial_never, Path(out, "never_initial.pt"))
        Path(out, "runs.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_unused")
    run_ranks(_job, str(out))
    return (json.loads((out / "runs.json").read_text()), torch.load(out / "weights.pt", weights_only=True),
            torch.load(out / "never_initial.pt", weights_only=True))


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("model", ["uses_all", "uneven"])
def test_the_first_step_decides_and_training_matches_ddp_with_the_search(runs, model):
    results, weights, _ = runs
    auto, search = results[f"{model}/auto"], results[f"{model}/search"]
    assert search["searches"] is True
    # every parameter used: the search is dropped after step 1; any unused parameter: it is kept
    assert auto["searches"] is (model == "uneven")
    assert len(auto["losses"]) == STEPS
    # step 1 is reduced by the probe (divide, then sum, as DDP does) and later steps by DDP itself: on
    # 2 ranks the sums are the same additions, so fp32 agrees to rounding
    assert auto["losses"] == pytest.approx(search["losses"], rel=1e-6, abs=0)
    assert _max_diff(weights[f"{model}/auto"], weights[f"{model}/search"]) < 1e-6
    start = {f"lm.{k}" if model == "uneven" else k: v for k, v in tiny_gpt2().state_dict().items()}
    moved = _max_diff(start, {k: weights[f"{model}/auto"][k] for k in start})
    assert moved > 1e-3, "the compared runs must have trained"


def test_a_parameter_used_on_one_rank_is_averaged_and_one_used_nowhere_stays_put(runs):
    _, weights, never_initial = runs
    auto = weights["uneven/auto"]
    assert torch.equal(auto["never.weight"], never_initial)  # no gradient anywhere: AdamW leaves it alone
    assert not torch.equal(auto["extra.weight"], UnevenUse().extra.weight)  # rank 0's gradient, averaged
