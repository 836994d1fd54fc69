"""Strategy options and misconfigurations, checked without any process group:
what is refused, with which message, and how DeepSpeed's JSON is derived."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_gpt2
from scaletrain import NotSupportedError, TrainingArguments
from scaletrain.parallel.environment import DistEnv, read_env
from scaletrain.strategies import build_strategy
from scaletrain.strategies.deepspeed import DeepSpeedConfigError, build_deepspeed_config
from scaletrain.strategies.fsdp import FSDPStrategy

ONE = DistEnv(0, 1, 0, 1)
TWO = DistEnv(0, 2, 0, 2)


def args(**kw) -> TrainingArguments:
    return TrainingArguments(output_dir="unused", **kw)


def test_deepspeed_json_is_derived_from_the_arguments():
    a = args(strategy="zero3", per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.7,
             offload_optimizer=True, offload_params=True,
             deepspeed={"zero_optimization": {"stage3_prefetch_bucket_size": 1000}, "train_batch_size": "auto",
                        "gradient_clipping": 0.7})
    config = build_deepspeed_config(a, stage=3, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24  # 4 x 3 x 2 ranks, "auto" filled in
    assert config["gradient_clipping"] == 0.7  # equal to ours: accepted
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == 1000  # the user's extra key is kept
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in config and "scheduler" not in config


@pytest.mark.parametrize("section, argument", [
    ({"train_micro_batch_size_per_gpu": 16}, "per_device_train_batch_size"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 5.0}, "max_grad_norm"),
    ({"zero_optimization": {"stage": 3}}, "strategy"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "learning_rate"),
    ({"scheduler": {"type": "WarmupLR"}}, "lr_scheduler_type"),
    ({"bf16": {"enabled": True}}, "bf16"),
])
def test_a_deepspeed_key_scaletrain_owns_is_refused_with_the_argument_to_set(section, argument):
    with pytest.raises(DeepSpeedConfigError, match=argument):
        build_strategy(args(strategy="zero2", deepspeed=section), ONE)


def test_a_deepspeed_config_picks_the_stage_when_strategy_is_auto(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    assert args(deepspeed=str(path)).strategy == "zero3"  # HF style: a JSON file path
    with pytest.raises(ValueError, match="set strategy: zero1, zero2 or zero3"):
        args(deepspeed={"train_batch_size": "auto"})
    with pytest.raises(ValueError, match="use zero1|zero2|zero3"):
        args(strategy="fsdp", deepspeed={"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("kw, message", [
    ({"strategy": "zero2", "offload_params": True}, "offload_params=True needs strategy: zero3"),
    ({"strategy": "ddp", "offload_optimizer": True}, "offload_optimizer=True needs strategy zero1"),
    ({"strategy": "zero3", "fsdp_cpu_offload": True}, "only applies to strategy: fsdp"),
    ({"strategy": "ddp", "fsdp_reshard_after_forward": False}, "only applies to strategy: fsdp"),
    ({"fsdp": "no_shard"}, "not supported"),  # hybrid_shard is HSDP (test_parallel_layout.py)
    ({"fsdp": "full_shard", "strategy": "zero2"}, "keep one of them"),
    ({"fsdp_config": {"min_num_params": 1000}}, "min_num_params"),
    ({"fsdp_config": {"version": 1}}, "only FSDP2"),
])
def test_option_combinations_that_cannot_work_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        args(**kw)


def test_hf_fsdp_arguments_map_onto_fsdp2():
    a = args(fsdp="shard_grad_op offload auto_wrap",
             fsdp_config={"transformer_layer_cls_to_wrap": "GPT2Block", "cpu_ram_efficient_loading": True})
    assert (a.strategy, a.fsdp_reshard_after_forward, a.fsdp_cpu_offload) == ("fsdp", False, True)
    assert a.fsdp_layer_classes == ["GPT2Block"] and a.fsdp_low_memory_init


def test_save_only_model_is_refused_under_deepspeed():
    with pytest.raises(NotSupportedError, match="save_only_model=True"):
        build_strategy(args(strategy="zero1", save_only_model=True), ONE)


def test_missing_deepspeed_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(NotSupportedError, match=r"pip install 'scaletrain\[deepspeed\]'"):
        build_strategy(args(strategy="zero3"), TWO)


def test_fsdp_finds_transformer_blocks_or_says_what_to_set():
    strategy = FSDPStrategy(args(strategy="fsdp"), ONE)
    assert [c.__name__ for c in strategy.layer_classes(tiny_gpt2())] == ["GPT2Block"]  # _no_split_modules

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Linear(8, 8)

    class Plain(torch.nn.Module):  # declares no _no_split_modules
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1)])
            self.layers = torch.nn.ModuleList([Block() for _ in range(3)])

    assert [c.__name__ for c in strategy.layer_classes(Plain())] == ["Block"]  # the largest repeated stack
    with pytest.raises(ValueError, match="set fsdp_layer_classes"):
        strategy.layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    named = FSDPStrategy(args(strategy="fsdp", fsdp_layer_classes=["LlamaDecoderLayer"]), ONE)
    with pytest.raises(ValueError, match=r"\['LlamaDecoderLayer'\], which are not module classes of GPT2LMHeadModel"):
        named.layer_classes(tiny_gpt2())


def test_accelerate_launch_settings_pick_and_configure_the_strategy(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    env = read_env()
    strategy = build_strategy(args(), env)
    assert strategy.name == "fsdp" and strategy.args.fsdp_cpu_offload and not strategy.args.fsdp_reshard_after_forward
    with pytest.raises(ValueError, match="the launcher asks for strategy 'fsdp' but the config sets strategy='ddp'"):
        build_strategy(args(strategy="ddp"), env)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    configured = build_strategy(args(), read_env()).args
    assert configured.activation_checkpointing and configured.bf16 and not configured.fp16
    with pytest.raises(ValueError, match="--mixed_precision and the config's bf16/fp16 disagree"):
        build_strategy(args(fp16=True), read_env())


def test_accelerate_deepspeed_settings(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    strategy = build_strategy(args(), read_env())
    assert strategy.name == "zero3" and strategy.args.offload_params
    assert strategy.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    strategy = build_strategy(args(), read_env())
    assert strategy.config["bf16"]["enabled"] is True and strategy.config["fp16"]["enabled"] is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(NotSupportedError, match="ACCELERATE_MIXED_PRECISION=fp8"):
        build_strategy(args(), read_env())


def test_cli_refuses_a_conflicting_deepspeed_key_before_starting(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  strategy: zero2\n  max_grad_norm: 1.0\n  deepspeed:\n    gradient_clipping: 5.0\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "scaletrain"), "train", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "gradient_clipping=5.0 but scaletrain derives 1.0 from max_grad_norm" in proc.stderr


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time


def test_deepspeed_file_loads_cannot_run_pickled_code(tmp_path):
    from scaletrain.checkpoint.state_formats import weights_only_loads

    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(str(marker))}, tmp_path / "optim_states.pt")
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "optim_states.pt", weights_only=False)  # how DeepSpeed calls it
    assert not marker.exists()
    torch.save({"step": torch.tensor(3)}, tmp_path / "plain.pt")
    with weights_only_loads():
        assert torch.load(tmp_path / "plain.pt", weights_only=False)["step"] == 3
