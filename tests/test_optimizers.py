"""Every `optim` name scaletrain accepts builds HF's optimizer for it and trains, in one process and
under the sharded strategies; every other HF name is refused before anything starts, with why."""
from __future__ import annotations

import importlib.util

import pytest
import transformers

from helpers import RaggedLM, run_ranks, tiny_gpt2, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.optimizers.catalog import CUDA_ONLY, LOW_RANK_OPTIMIZERS, SUPPORTED

# what each sharded strategy accepts, bitsandbytes included where it works (scaletrain/optimizers/catalog.py)
SHARDED_SAMPLES = {"ddp": ("apollo_adamw", "schedule_free_sgd", "galore_adafactor"),
                   "fsdp": ("rmsprop", "adagrad", "sgd", "schedule_free_adamw", "galore_adamw", "grokadamw",
                            "stable_adamw"),
                   "zero2": ("adafactor", "adamw_8bit", "paged_adamw_32bit", "lion_32bit", "rmsprop", "grokadamw",
                             "stable_adamw")}
# GaLore/APOLLO project nn.Linear weights (tiny GPT-2 has Conv1D layers)
LOW_RANK = dict(optim_target_modules=["self_attn", "mlp"], optim_args="rank=4,update_proj_gap=2")


def _args(out, optim: str, **kw) -> TrainingArguments:
    low_rank = LOW_RANK if optim in LOW_RANK_OPTIMIZERS else {}
    kw = {"max_steps": 2, **kw}
    return TrainingArguments(output_dir=str(out), optim=optim, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             report_to="none", seed=0, **low_rank, **kw)


def _model(optim: str):
    return tiny_llama() if optim in LOW_RANK_OPTIMIZERS else tiny_gpt2()


def _moved(trainer, start: dict) -> float:
    """How far training moved the weights (gathered whole: a collective under sharding)."""
    full = trainer.strategy.full_model_state_dict(trainer.model_wrapped)  # rank 0 at least holds it
    return max(((full[k].float() - start[k].float()).abs().max().item() for k in start if k in full), default=None)


def _installed(optim: str):
    """torchao's optimizers need the float8 extra (pyproject.toml), which make test installs; they compile their
    step (about a minute on 2 cores), so they run with the slow tests."""
    if optim not in ("adamw_torch_4bit", "adamw_torch_8bit"):
        return optim
    missing = importlib.util.find_spec("torchao") is None
    return pytest.param(optim, marks=[pytest.mark.slow, pytest.mark.skipif(missing, reason="torchao is not installed")])


@pytest.mark.parametrize("optim", [_installed(name) for name in SUPPORTED if name not in CUDA_ONLY])
def test_each_supported_optimizer_is_hfs_and_trains(tmp_path, optim):
    start = _model(optim).state_dict()
    # RAdam's rectification leaves the first steps without an update
    steps = {"max_steps": 8} if optim == "schedule_free_radam" else {}
    trainer = Trainer(model=_model(optim), args=_args(tmp_path, optim, strategy="single", **steps),
                      train_dataset=RaggedLM(16))
    trainer.train()
    hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), optim=optim, use_cpu=True,
                                             **(LOW_RANK if optim in LOW_RANK_OPTIMIZERS else {}))
    hf_cls, _ = transformers.Trainer.get_optimizer_cls_and_kwargs(hf_args, _model(optim))
    assert type(trainer.optimizer) is hf_cls
    assert _moved(trainer, start) > 1e-5


@pytest.mark.parametrize("optim, kw, error, why", [
    ("lomo", {}, NotSupportedError, "fuses the update into backward"),
    ("galore_adamw_layerwise", {}, NotSupportedError, "steps each parameter inside backward, .*; use galore_adamw"),
    ("galore_adamw_8bit", LOW_RANK, NotSupportedError, "runs CUDA kernels only"),
    ("adamw_typo", {}, ValueError, "not one of HF's optimizer names"),
    ("galore_adamw", {}, ValueError, "optim_target_modules, which is not set"),
    ("adamw_torch", {"optim_target_modules": ["mlp"]}, NotSupportedError, "read only by GaLore/APOLLO"),
    ("adamw_torch", {"optim_args": "betas=0.8"}, NotSupportedError, "reads no optim_args"),
    ("sgd", {"optim_args": "momentun=0.9"}, ValueError, "'momentun' is not read by optim='sgd'"),
    ("sgd", {"optim_args": "momentum:0.9"}, ValueError, "'momentum:0.9' is not key=value"),
    ("schedule_free_adamw", {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"},
     NotSupportedError, "a checkpoint holds a schedule-free optimizer's training point"),
])
def test_optimizer_mistakes_are_refused_at_construction_with_the_reason(tmp_path, optim, kw, error, why):
    with pytest.raises(error, match=why):
        TrainingArguments(output_dir=str(tmp_path), optim=optim, **kw)


def _sharded_job(rank: int, out: str, strategy: str) -> None:
    for optim in SHARDED_SAMPLES[strategy]:
        start = _model(optim).state_dict()
        trainer = Trainer(model=_model(optim), args=_args(f"{out}/{optim}", optim, strategy=strategy),
                          train_dataset=RaggedLM(16))
        trainer.train()
        moved = _moved(trainer, start)
        if trainer.strategy.is_main:
            assert moved is not None and moved > 1e-5, (strategy, optim, moved)
    trainer.strategy.teardown()


@pytest.mark.parametrize("strategy", sorted(SHARDED_SAMPLES))
def test_optimizers_train_under_sharded_strategies(tmp_path, strategy):
    run_ranks(_sharded_job, str(tmp_path), strategy)


@pytest.mark.parametrize("strategy, optim, instead", [
    ("fsdp", "adamw_8bit", "ddp or zero1 or zero2 or zero3"), ("fsdp", "adafactor", "ddp or zero1"),
    ("zero2", "adagrad", "ddp or fsdp"), ("zero2", "schedule_free_adamw", "ddp or fsdp"),
    ("zero3", "galore_adamw", "ddp or fsdp"), ("fsdp", "apollo_adamw", "ddp, or choose")])
def test_an_optimizer_a_strategy_cannot_step_is_refused_before_launch(tmp_path, strategy, optim, instead):
    with pytest.raises(NotSupportedError, match=f"optim='{optim}' does not work with strategy '{strategy}'; "
                                                f"use it with {instead}"):
        _args(tmp_path, optim, strategy=strategy)
