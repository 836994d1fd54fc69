"""Backends as Strategy objects, chosen by the `strategy` argument."""
from __future__ import annotations

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


def build_strategy(args, env: DistEnv | None = None) -> Strategy:
    """The backend object for `args.strategy`. The arguments are final (the launcher's requests were applied
    when they were made: args/launcher.py), so the strategy reads them as they are; constructing it checks
    them against this process's environment. No process group starts until `setup_environment()`."""
    env = env or read_env()
    return resolve_strategy_class(args.strategy, env)(args, env)


__all__ = ["Strategy", "SingleDeviceStrategy", "DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy",
           "build_strategy", "register_strategy", "resolve_strategy_class"]
