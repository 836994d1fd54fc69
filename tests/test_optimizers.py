"""Every `optim` name scaletrain accepts builds HF's optimizer for it and trains, in one process and
under the sharded strategies; every other HF name is refused before anything starts, with why."""
from __future__ import annotations

import pytest
import transformers

from helpers import RaggedLM, run_ranks, tiny_gpt2
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.optimizers import SUPPORTED

# what each sharded strategy accepts, bitsandbytes included where it works (scaletrain/optimizers.py)
SHARDED_SAMPLES = {"fsdp": ("rmsprop", "adagrad", "sgd"),
                   "zero2": ("adafactor", "adamw_8bit", "paged_adamw_32bit", "lion_32bit", "rmsprop")}


def _args(out, optim: str, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), optim=optim, max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             report_to="none", seed=0, **kw)


def _moved(trainer, start: dict) -> float:
    """How far training moved the weights (gathered whole: a collective under sharding)."""
    full = trainer.strategy.full_model_state_dict(trainer.model_wrapped)  # rank 0 at least holds it
    return max(((full[k].float() - start[k].float()).abs().max().item() for k in start if k in full), default=None)


@pytest.mark.parametrize("optim", SUPPORTED)
def test_each_supported_optimizer_is_hfs_and_trains(tmp_path, optim):
    start = tiny_gpt2().state_dict()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, optim, strategy="single"), train_dataset=RaggedLM(16))
    trainer.train()
    hf_cls, _ = transformers.Trainer.get_optimizer_cls_and_kwargs(
        transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), optim=optim, use_cpu=True))
    assert type(trainer.optimizer) is hf_cls
    assert _moved(trainer, start) > 1e-5


@pytest.mark.parametrize("optim, why", [("lomo", "fuses the update into backward"),
                                        ("galore_adamw", "optim_target_modules"),
                                        ("schedule_free_adamw", "train/eval mode")])
def test_other_hf_optimizers_are_refused_with_the_reason(tmp_path, optim, why):
    with pytest.raises(NotSupportedError, match=why):
        _args(tmp_path, optim)
    with pytest.raises(ValueError, match="not one of HF's optimizer names"):
        _args(tmp_path, "adamw_typo")


def _sharded_job(rank: int, out: str, strategy: str) -> None:
    for optim in SHARDED_SAMPLES[strategy]:
        start = tiny_gpt2().state_dict()
        trainer = Trainer(model=tiny_gpt2(), args=_args(f"{out}/{optim}", optim, strategy=strategy),
                          train_dataset=RaggedLM(16))
        trainer.train()
        moved = _moved(trainer, start)
        if trainer.strategy.is_main:
            assert moved is not None and moved > 1e-5, (strategy, optim, moved)
    trainer.strategy.teardown()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(SHARDED_SAMPLES))
def test_optimizers_train_under_sharded_strategies(tmp_path, strategy):
    run_ranks(_sharded_job, str(tmp_path), strategy)


@pytest.mark.parametrize("strategy, optim", [("fsdp", "adamw_8bit"), ("fsdp", "adafactor"), ("zero2", "adagrad")])
def test_an_optimizer_a_strategy_cannot_step_is_refused_before_launch(tmp_path, strategy, optim):
    with pytest.raises(NotSupportedError, match=f"optim='{optim}' does not work with strategy '{strategy}'"):
        _args(tmp_path, optim, strategy=strategy)
