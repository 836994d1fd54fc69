"""Backends as Strategy objects, chosen by the `strategy` argument."""
from __future__ import annotations

import dataclasses

from ..errors import NotSupportedError
from ..parallel.environment import DistEnv, read_env
from .base import Strategy
from .ddp import DDPStrategy
from .deepspeed import DeepSpeedStrategy
from .fsdp import FSDPStrategy
from .single import SingleDeviceStrategy

_REGISTRY: dict[str, type[Strategy]] = {
    SingleDeviceStrategy.name: SingleDeviceStrategy,
    DDPStrategy.name: DDPStrategy,
    FSDPStrategy.name: FSDPStrategy,
    **{f"zero{stage}": DeepSpeedStrategy for stage in (1, 2, 3)},
}


def register_strategy(cls: type[Strategy], name: str | None = None) -> type[Strategy]:
    _REGISTRY[name or cls.name] = cls
    return cls


def resolve_strategy_class(name: str, env: DistEnv) -> type[Strategy]:
    if name == "auto":
        name = "ddp" if env.is_distributed else "single"
    if name not in _REGISTRY:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(set(_REGISTRY) | {'auto'})}")
    cls = _REGISTRY[name]
    cls.check_environment(env)
    return cls


def apply_launcher_settings(args, env: DistEnv):
    """Arguments with the launcher's requests applied (e.g. `accelerate launch
    --use_fsdp` picks strategy fsdp when the config says auto). A request that
    contradicts an explicit setting, or that scaletrain cannot honour, is an error."""
    settings = dict(env.launcher_settings)
    refused = settings.pop("refuse", [])
    if refused:
        raise NotSupportedError("the launcher asked for " + "; ".join(refused))
    if not settings:
        return args
    wanted = settings.pop("strategy", args.strategy)
    if args.strategy not in ("auto", wanted):
        raise ValueError(
            f"the launcher asks for strategy {wanted!r} but the config sets strategy={args.strategy!r}; "
            "drop one of them (e.g. launch without --use_fsdp/--use_deepspeed, or set strategy: auto)"
        )
    if args.deepspeed and "deepspeed" in settings:
        raise ValueError("both the config's deepspeed section and the launcher's --deepspeed_config_file are set; "
                         "keep one of them")
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    # the config's explicit choices win over the launcher's defaults
    # (a flag the launcher turns on also overrides the config's False: the two are indistinguishable)
    changes = {k: v for k, v in settings.items()
               if getattr(args, k) == defaults[k] or (v is True and not getattr(args, k))}
    if (changes.get("bf16") and args.fp16) or (changes.get("fp16") and args.bf16):
        raise ValueError("the launcher's --mixed_precision and the config's bf16/fp16 disagree; keep one of them")
    return dataclasses.replace(args, strategy=wanted, **changes)


def build_strategy(args, env: DistEnv | None = None) -> Strategy:
    """The backend object for `args.strategy` (after the launcher's requests).
    Constructing it validates the arguments against the backend; no process
    group starts until `setup_environment()`."""
    env = env or read_env()
    args = apply_launcher_settings(args, env)
    return resolve_strategy_class(args.strategy, env)(args, env)


__all__ = ["Strategy", "SingleDeviceStrategy", "DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy",
           "apply_launcher_settings", "build_strategy", "register_strategy", "resolve_strategy_class"]
