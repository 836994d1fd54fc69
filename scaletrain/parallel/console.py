"""One voice per run: what each process prints.

The main process (each node's first with log_on_each_node) prints progress bars, transformers' and
datasets' info and scaletrain's own lines; the other processes print warnings and errors only (HF's
log_level / log_level_replica), prefixed with their rank so a user can tell where a problem is. Used by
the CLI; a Python script keeps its own logging set-up (the Trainer applies HF's log levels only).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

# bitsandbytes, imported by peft whenever transformers is (both optional here), logs at import that its
# CPU kernel for repacked 4-bit inference could not be fetched from the hub. scaletrain's 4-bit layers
# stay on bitsandbytes' autograd path, which that kernel does not serve (middleware/quantization.py),
# so the message says nothing about a scaletrain run
_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_CPU_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward"


# torchao (float8=True), imported by transformers with its model classes, logs at import that its CUDA kernels
# (and, on torch's CPU build, every compiled extension) could not be loaded, and registers its enums with
# torch's pytree in a way torch now logs as deprecated. On a CPU-only torch build neither says anything about
# a run: float8 training there runs torch's own _scaled_mm. On a CUDA build the kernel messages stay
_TORCHAO_LOGGER, _TORCHAO_MESSAGE = "torchao", "Failed to load "
_PYTREE_LOGGER, _PYTREE_ENUM_MESSAGE = "torch.utils._pytree", "%s is an Enum subclass and is now natively supported"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_optional_imports() -> None:
    """Before transformers is imported: no import-time message from optional packages a run may not use."""
    logging.getLogger(_BNB_CPU_KERNEL_LOGGER).addFilter(_DropMessage(_BNB_CPU_KERNEL_MESSAGE))
    import torch

    if torch.version.cuda is None:
        logging.getLogger(_TORCHAO_LOGGER).addFilter(_DropMessage(_TORCHAO_MESSAGE))
        logging.getLogger(_PYTREE_LOGGER).addFilter(_DropMessage(_PYTREE_ENUM_MESSAGE))


class _AboveProgressBars(logging.StreamHandler):
    """Log lines written above the progress bar (tqdm.write) instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure_console(env, args) -> None:
    """This process's output for a CLI run (before data preparation, so its progress shows once)."""
    import datasets
    from transformers.utils import logging as hf_logging

    speaks = env.logs(args.log_on_each_node)
    prefix = f"[rank{env.rank}] %(levelname)s %(name)s: %(message)s"
    handler = _AboveProgressBars()
    handler.setFormatter(logging.Formatter(prefix))
    logging.basicConfig(level=logging.INFO if speaks else logging.WARNING, handlers=[handler])
    level = args.get_process_log_level()
    hf_logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    for handler in logging.getLogger("transformers").handlers:
        handler.setFormatter(logging.Formatter(prefix))
    # weight loading and shard writing take a second or two here; the start line and the summary say
    # what was loaded and written
    hf_logging.disable_progress_bar()
    if not speaks:
        datasets.disable_progress_bars()


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers at error level inside (its load report, which the caller replaces with its own)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
