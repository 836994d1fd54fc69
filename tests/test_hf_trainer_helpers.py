"""HF Trainer helper methods that scripts call, checked on transformers.Trainer and scaletrain's Trainer
side by side: the same answers from the same model and arguments."""
from __future__ import annotations

import pytest
import transformers

from helpers import tiny_llama
import scaletrain

TRAINERS = {"hf": (transformers.Trainer, transformers.TrainingArguments),
            "scaletrain": (scaletrain.Trainer, scaletrain.TrainingArguments)}


def _trainer(kind: str, tmp_path):
    trainer_cls, args_cls = TRAINERS[kind]
    kwargs = {"use_cpu": True} if kind == "hf" else {}
    args = args_cls(output_dir=str(tmp_path / kind), weight_decay=0.1, learning_rate=3e-4, report_to="none",
                    **kwargs)
    return trainer_cls(model=tiny_llama(), args=args)


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_get_optimizer_group_lists_every_groups_parameters(kind, tmp_path):
    trainer = _trainer(kind, tmp_path)
    with pytest.raises(ValueError):
        trainer.get_optimizer_group()  # no optimizer yet
    trainer.create_optimizer()
    groups = trainer.get_optimizer_group()
    assert [len(params) for params in groups] == [len(g["params"]) for g in trainer.optimizer.param_groups]
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for params in groups for p in params} == trainable  # every parameter in exactly one group
    assert sum(len(params) for params in groups) == len(trainable)


def test_get_optimizer_group_of_a_parameter(tmp_path):
    """HF's version looks a parameter up with `in`, which compares tensors element-wise and raises for
    any parameter it meets before the one asked for; scaletrain's compares identity (a deliberate
    difference: the helper then does what its docstring says)."""
    hf = _trainer("hf", tmp_path)
    hf.create_optimizer()
    with pytest.raises(RuntimeError, match="ambiguous"):
        hf.get_optimizer_group(hf.model.model.norm.weight)
    trainer = _trainer("scaletrain", tmp_path)
    trainer.create_optimizer()
    norm = trainer.model.model.norm.weight  # no weight decay on normalisation weights (HF's rule)
    projection = trainer.model.model.layers[0].self_attn.q_proj.weight
    assert trainer.get_optimizer_group(norm)["weight_decay"] == 0.0
    assert trainer.get_optimizer_group(projection)["weight_decay"] == pytest.approx(0.1)
    assert any(p is norm for p in trainer.get_optimizer_group(norm)["params"])


def test_both_trainers_group_the_same_parameters(tmp_path):
    grouped = {}
    for kind in TRAINERS:
        trainer = _trainer(kind, tmp_path)
        trainer.create_optimizer()
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        grouped[kind] = sorted((g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                               for g in trainer.optimizer.param_groups)
    assert grouped["scaletrain"] == grouped["hf"]
    assert len(grouped["hf"]) == 2 and all(names for _, names in grouped["hf"])  # a decay and a no-decay group


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_save_strategy_best_without_a_metric_is_refused_by_the_trainer_not_the_arguments(kind, tmp_path):
    trainer_cls, args_cls = TRAINERS[kind]
    kwargs = {"use_cpu": True} if kind == "hf" else {}
    args = args_cls(output_dir=str(tmp_path), save_strategy="best", eval_strategy="no", report_to="none", **kwargs)
    assert args.metric_for_best_model is None  # the arguments stand on their own
    with pytest.raises(ValueError, match="metric_for_best_model"):
        trainer_cls(model=tiny_llama(), args=args)
