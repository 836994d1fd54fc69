"""Bad input fails early, naming the value and the fix."""
from __future__ import annotations

import warnings

import pytest
import transformers

from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.args.run_config import ConfigError, load_config, resolve_config_path
from scaletrain.parallel.environment import DistEnv
from scaletrain.strategies import resolve_strategy_class


def test_every_hf_field_name_is_accepted():
    hf_names = {f.name for f in transformers.TrainingArguments.__dataclass_fields__.values() if f.init}
    ours = set(TrainingArguments.__dataclass_fields__)
    assert hf_names <= ours


@pytest.mark.parametrize("field,value", [("debug", "underflow_overflow"), ("push_to_hub", True),
                                         ("dataloader_in_order", False)])
def test_accepted_but_unimplemented_fields_raise(field, value):
    with pytest.raises(NotSupportedError, match=f"{field}={value!r} is not supported yet"):
        TrainingArguments(**{field: value})


def test_deprecated_evaluation_strategy_still_works():
    with pytest.warns(FutureWarning, match="eval_strategy"):
        args = TrainingArguments(evaluation_strategy="epoch")
    assert args.eval_strategy == "epoch"


@pytest.mark.parametrize("kwargs,message", [
    ({"load_best_model_at_end": True}, "needs eval_strategy"),
    ({"eval_strategy": "sometimes"}, "eval_strategy='sometimes' is not one of"),
    ({"strategy": "zero4"}, "strategy='zero4' is not one of"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 must be >= 1"),
    ({"warmup_ratio": 0.1, "warmup_steps": 5}, "keep one of them"),
    ({"report_to": "comet_ml"}, "not supported"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(**kwargs)


def test_hf_training_arguments_object_is_refused_clearly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_args = transformers.TrainingArguments(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="pass scaletrain.TrainingArguments"):
        Trainer(model=None, args=hf_args)


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge(tmp_path):
    path = write(tmp_path, "model: {name_or_path: minilm}\ntraining: {learning_rate: 3e-5, max_steps: 5}\n")
    cfg = load_config(path, ["--learning_rate", "1e-4", "--data.train_size=10", "--report_to", "wandb"])
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 5 and cfg.data.train_size == 10 and cfg.training.report_to == ["wandb"]


@pytest.mark.parametrize("text,overrides,message", [
    ("trainig: {}\n", [], "unknown key 'trainig'.*did you mean 'training'"),
    ("training: {learning_rat: 1}\n", [], "unknown key 'learning_rat'.*did you mean 'learning_rate'"),
    ("training: {}\n", ["--max_steps", "ten"], "training.max_steps='ten' must be an integer"),
    ("training: {}\n", ["--num_train_epochs"], "has no value"),
    ("training: {eval_strategy: epoch, load_best_model_at_end: true, save_strategy: steps}\n", [],
     "needs save_strategy"),
])
def test_config_errors(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="trec-minilm"):
        resolve_config_path("no-such-recipe")


def test_strategy_checks_happen_before_any_process_group():
    two_ranks = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2)
    with pytest.raises(ValueError, match="every rank would train its own copy"):
        resolve_strategy_class("single", two_ranks)
    assert resolve_strategy_class("auto", two_ranks).name == "ddp"
    assert resolve_strategy_class("auto", DistEnv(0, 1, 0, 1)).name == "single"
