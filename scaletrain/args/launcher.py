"""The launcher's requests (`accelerate launch --use_fsdp --mixed_precision bf16`, ...) applied to the
arguments when they are made, so that every later reader (validation, the strategy, the Trainer, a
search trial) sees one final configuration."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import NotSupportedError
from .json_options import read_json_option


def apply_launcher_settings(args, settings: dict[str, Any]) -> None:
    """Apply `settings` (parallel.environment.launcher_settings()) to `args` in place. A request that
    contradicts an explicit setting, or that scaletrain cannot honour, is an error. Applying the same
    settings twice changes nothing (dataclasses.replace runs the checks again)."""
    settings = dict(settings)
    refused = settings.pop("refuse", [])
    if refused:
        raise NotSupportedError("the launcher asked for " + "; ".join(refused))
    if not settings:
        return
    wanted = settings.pop("strategy", args.strategy)
    if args.strategy not in ("auto", wanted):
        raise ValueError(
            f"the launcher asks for strategy {wanted!r} but the config sets strategy={args.strategy!r}; "
            "drop one of them (e.g. launch without --use_fsdp/--use_deepspeed, or set strategy: auto)"
        )
    if args.deepspeed and "deepspeed" in settings and \
            read_json_option("deepspeed", args.deepspeed) != read_json_option("deepspeed", settings["deepspeed"]):
        raise ValueError("both the config's deepspeed section and the launcher's --deepspeed_config_file are set; "
                         "keep one of them")
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    # the config's explicit choices win over the launcher's defaults
    # (a flag the launcher turns on also overrides the config's False: the two are indistinguishable)
    changes = {k: v for k, v in settings.items()
               if getattr(args, k) == defaults[k] or (v is True and not getattr(args, k))}
    if (changes.get("bf16") and args.fp16) or (changes.get("fp16") and args.bf16):
        raise ValueError("the launcher's --mixed_precision and the config's bf16/fp16 disagree; keep one of them")
    args.strategy = wanted
    for name, value in changes.items():
        setattr(args, name, value)
