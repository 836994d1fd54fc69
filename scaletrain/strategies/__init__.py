"""Backends as Strategy objects, chosen by the `strategy` argument."""
from __future__ import annotations

from ..args import NotSupportedError
from ..distributed import DistEnv, read_env
from .base import Strategy
from .ddp import DDPStrategy
from .single import SingleDeviceStrategy

_REGISTRY: dict[str, type[Strategy]] = {
    SingleDeviceStrategy.name: SingleDeviceStrategy,
    DDPStrategy.name: DDPStrategy,
}
_PLANNED = {
    "fsdp": "FSDP2 sharding",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    _REGISTRY[cls.name] = cls
    return cls


def resolve_strategy_class(name: str, env: DistEnv) -> type[Strategy]:
    if name == "auto":
        name = "ddp" if env.is_distributed else "single"
    if name in _REGISTRY:
        cls = _REGISTRY[name]
        cls.check_environment(env)
        return cls
    if name in _PLANNED:
        raise NotSupportedError(
            f"strategy={name!r} ({_PLANNED[name]}) is not supported yet by scaletrain; use 'ddp' or 'single'"
        )
    raise ValueError(f"strategy={name!r} is unknown; choose one of {sorted(set(_REGISTRY) | set(_PLANNED) | {'auto'})}")


def build_strategy(args, env: DistEnv | None = None) -> Strategy:
    env = env or read_env()
    return resolve_strategy_class(args.strategy, env)(args, env)


__all__ = ["Strategy", "SingleDeviceStrategy", "DDPStrategy", "build_strategy", "register_strategy", "resolve_strategy_class"]
