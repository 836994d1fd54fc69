"""Each backend's options, checked by the backend's own module when the arguments are built."""
from __future__ import annotations

from .deepspeed import check_options as check_deepspeed_options
from .fsdp import check_options as check_fsdp_options
from .precision import check_options as check_precision_options


def check_strategy_options(args) -> None:
    """Raise for an option of one backend set under another (it would be ignored) or an invalid one."""
    for check in (check_fsdp_options, check_deepspeed_options, check_precision_options):
        check(args)
