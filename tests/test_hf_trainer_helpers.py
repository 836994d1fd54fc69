"""HF Trainer helper methods that scripts call, checked on transformers.Trainer and scaletrain's Trainer
side by side: the same answers from the same model and arguments."""
from __future__ import annotations

import logging

import pytest
import torch
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


class _CheckpointingConfig(transformers.PretrainedConfig):
    model_type = "checkpointing-in-forward"

    def __init__(self, hidden: int = 8, layers: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden, self.layers = hidden, layers


class _CheckpointsInItsForward(transformers.PreTrainedModel):
    """A custom model that checkpoints in its own forward (the style of models written before
    GradientCheckpointingLayer): transformers' hook flags the model itself, no layer."""
    config_class = _CheckpointingConfig
    supports_gradient_checkpointing = True

    def __init__(self, config: _CheckpointingConfig) -> None:
        super().__init__(config)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(config.hidden, config.hidden) for _ in range(config.layers))
        self.gradient_checkpointing = False
        self.recomputed = 0
        self.post_init()

    def forward(self, inputs, labels=None):
        hidden = inputs
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                self.recomputed += 1
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden)
            else:
                hidden = layer(hidden)
        return {"loss": ((hidden.sum(-1) - labels) ** 2).mean(), "logits": hidden}


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 8, generator=generator), torch.randn(16, generator=generator)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_gradient_checkpointing_on_a_model_that_checkpoints_in_its_own_forward(kind, tmp_path):
    trainer_cls, args_cls = TRAINERS[kind]
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _CheckpointsInItsForward(_CheckpointingConfig())
        kwargs = {"use_cpu": True} if kind == "hf" else {}
        args = args_cls(output_dir=str(tmp_path / str(checkpointing)), gradient_checkpointing=checkpointing,
                        per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_strategy="no",
                        report_to="none", disable_tqdm=True, learning_rate=1e-2, **kwargs)
        trainer = trainer_cls(model=model, args=args, train_dataset=_Rows())
        trainer.train()
        losses[checkpointing] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert (model.recomputed > 0) is checkpointing  # the model's own checkpointed path ran
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)  # recomputation changes no number


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_running_training_block_on_hfs_trainer_logger(kind, tmp_path):
    from transformers.utils import logging as hf_logging

    trainer_cls, args_cls = TRAINERS[kind]
    kwargs = {"use_cpu": True} if kind == "hf" else {}
    args = args_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_train_epochs=2, save_strategy="no", report_to="none", disable_tqdm=True, **kwargs)
    handler, verbosity = _Lines(), hf_logging.get_verbosity()
    logging.getLogger("transformers.trainer").addHandler(handler)
    hf_logging.set_verbosity_info()
    try:
        trainer_cls(model=_CheckpointsInItsForward(_CheckpointingConfig()), args=args, train_dataset=_Rows()).train()
    finally:
        logging.getLogger("transformers.trainer").removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    start = handler.lines.index("***** Running training *****")
    block = dict(line.strip().split(" = ") for line in handler.lines[start + 1:start + 9] if " = " in line)
    # 16 rows, 4 per micro-batch, 2 micro-batches per step: 2 steps an epoch, 4 in 2 epochs
    assert block["Num examples"] == "16" and block["Num Epochs"] == "2"
    assert block["Total train batch size (w. parallel, distributed & accumulation)"] == "8"
    assert block["Total optimization steps"] == "4" and block["Num update steps per epoch"] == "2"
    assert block["Number of trainable parameters"] == str(3 * (8 * 8 + 8))


def _training_args(kind: str, tmp_path, **extra):
    trainer_cls, args_cls = TRAINERS[kind]
    kwargs = {"use_cpu": True} if kind == "hf" else {}
    return trainer_cls, args_cls(output_dir=str(tmp_path / kind), learning_rate=1e-3, report_to="none",
                                 per_device_train_batch_size=4, disable_tqdm=True, **kwargs, **extra)


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_patching_evaluate_steers_the_best_checkpoint(kind, tmp_path):
    """Scripts and HF's tests replace `_evaluate(trial, ignore_keys_for_eval, ...)`: training must evaluate
    through it, and its metrics decide the best checkpoint."""
    from unittest.mock import patch

    from helpers import RaggedLM

    trainer_cls, args = _training_args(kind, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                                       save_strategy="best", metric_for_best_model="accuracy")
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=RaggedLM(24), eval_dataset=RaggedLM(8))
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.6])
    with patch.object(trainer, "_evaluate", side_effect=lambda *a, **k: {"eval_accuracy": next(scores)}) as evaluate:
        trainer.train()
    # steps 2, 4, 6, and the epoch's end at 6 (both trainers evaluate there again)
    assert evaluate.call_count == 4 and evaluate.call_args.args[0] is None  # (trial, ignore_keys_for_eval)
    assert trainer.state.best_global_step == 4 and trainer.state.best_metric == 0.9
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_enable_jit_checkpoint_lists_hfs_callback_and_leaves_sigterm_as_it_was(kind, tmp_path):
    import signal

    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    from helpers import RaggedLM

    before = signal.getsignal(signal.SIGTERM)
    trainer_cls, args = _training_args(kind, tmp_path, max_steps=2, enable_jit_checkpoint=True)
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=RaggedLM(8))
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, JITCheckpointCallback)]
    assert len(found) == 1 and found[0].trainer is trainer and found[0].jit_manager is not None
    trainer.train()
    assert signal.getsignal(signal.SIGTERM) is before  # no handler outlives training
    signal.signal(signal.SIGTERM, before)


def test_a_float_attention_mask_trains_as_under_hf(tmp_path):
    """Token counting must not assume an integer mask (HF counts only when asked)."""
    from helpers import RaggedLM

    class FloatMask(RaggedLM):
        def __getitem__(self, i):
            row = dict(super().__getitem__(i))
            return {**row, "attention_mask": row["attention_mask"].float()}

    losses = {}
    for kind in TRAINERS:
        trainer_cls, args = _training_args(kind, tmp_path, max_steps=3, logging_steps=1, seed=0, save_strategy="no")
        trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=FloatMask(12))
        trainer.train()
        losses[kind] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses["scaletrain"]) == 3
    assert losses["scaletrain"] == pytest.approx(losses["hf"], abs=1e-5)


def test_the_accelerator_view_unwraps_data_parallel_as_accelerate_does(tmp_path):
    trainer = _trainer("scaletrain", tmp_path)
    model = tiny_llama()
    assert trainer.accelerator.unwrap_model(torch.nn.DataParallel(model)) is model
