"""Each backend's options, checked by the backend's own module when the arguments are built."""
from __future__ import annotations

from ..errors import NotSupportedError
from .deepspeed import check_options as check_deepspeed_options
from .fsdp import check_options as check_fsdp_options
from .precision import check_options as check_precision_options


def check_strategy_options(args) -> None:
    """Raise for an option of one backend set under another (it would be ignored) or an invalid one."""
    for check in (check_fsdp_options, check_deepspeed_options, check_precision_options, check_node_local_saves):
        check(args)


def check_node_local_saves(args) -> None:
    """save_on_each_node: each node's first process writes a whole checkpoint on its own disk, which only a
    strategy whose every rank holds the whole state can do."""
    if not args.save_on_each_node:
        return
    if args.strategy not in ("auto", "single", "ddp"):
        raise NotSupportedError(
            f"save_on_each_node=True with strategy {args.strategy!r}: a sharded checkpoint holds every rank's "
            "shard, so the nodes must share one filesystem (drop save_on_each_node), or train with ddp")
    if args.save_async:
        raise NotSupportedError("save_on_each_node=True with save_async=True: node-local checkpoints are written "
                                "synchronously; drop one of them")
