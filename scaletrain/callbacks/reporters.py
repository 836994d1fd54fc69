"""report_to: the integrations scaletrain reports to, each through the callback HF's Trainer uses for it
(W&B through scaletrain's own observer; TensorBoard and MLflow through transformers' callbacks, which log
on the world-process-zero rank only, with the run name and the arguments as HF logs them), and "jsonl":
every log appended to output_dir/metrics.jsonl (the CLI always writes it; in Python it is opt-in, so the
callbacks and files of a script match what HF's Trainer gives it)."""
from __future__ import annotations

import importlib.util

from ..errors import NotSupportedError

JSONL = "jsonl"  # scaletrain's own: output_dir/metrics.jsonl
# report_to name -> (module that must import, pip package)
REPORTERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
             "mlflow": ("mlflow", "mlflow-skinny")}


def _installed(name: str) -> bool:
    module = REPORTERS[name][0]
    if name == "tensorboard":  # transformers' TensorBoardCallback also writes with tensorboardX
        return importlib.util.find_spec(module) is not None or importlib.util.find_spec("tensorboardX") is not None
    return importlib.util.find_spec(module) is not None


def installed_reporters() -> list[str]:
    """HF's report_to='all': every supported integration that is installed, and metrics.jsonl."""
    return [name for name in REPORTERS if _installed(name)] + [JSONL]


def check_reporters(report_to: list[str]) -> None:
    unknown = sorted(set(report_to) - set(REPORTERS) - {JSONL})
    if unknown:
        raise NotSupportedError(f"report_to={report_to!r}: {unknown} not supported; use any of "
                                f"{sorted(REPORTERS) + [JSONL]}, 'all' or 'none'")
    for name in report_to:
        if name in REPORTERS and not _installed(name):
            raise NotSupportedError(f"report_to includes {name!r}, which is not installed: pip install "
                                    f"{REPORTERS[name][1]} (or 'scaletrain[loggers]')")


def reporter_callbacks(report_to: list[str]) -> list:
    from transformers.integrations import MLflowCallback, TensorBoardCallback

    from .observers import JsonlMetricsCallback, WandbCallback

    made = {"wandb": WandbCallback, "tensorboard": TensorBoardCallback, "mlflow": MLflowCallback,
            JSONL: JsonlMetricsCallback}
    return [made[name]() for name in report_to if name in made]
