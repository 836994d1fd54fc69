"""report_to: the integrations scaletrain reports to, each through the callback HF's Trainer uses for it
(W&B through scaletrain's own observer; TensorBoard and MLflow through transformers' callbacks, which log
on the world-process-zero rank only, with the run name and the arguments as HF logs them)."""
from __future__ import annotations

import importlib.util

from ..errors import NotSupportedError

# report_to name -> (module that must import, pip package)
REPORTERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
             "mlflow": ("mlflow", "mlflow-skinny")}


def _installed(name: str) -> bool:
    module = REPORTERS[name][0]
    if name == "tensorboard":  # transformers' TensorBoardCallback also writes with tensorboardX
        return importlib.util.find_spec(module) is not None or importlib.util.find_spec("tensorboardX") is not None
    return importlib.util.find_spec(module) is not None


def installed_reporters() -> list[str]:
    """HF's report_to='all': every supported integration that is installed."""
    return [name for name in REPORTERS if _installed(name)]


def check_reporters(report_to: list[str]) -> None:
    unknown = sorted(set(report_to) - set(REPORTERS) - {"jsonl"})
    if unknown:
        raise NotSupportedError(f"report_to={report_to!r}: {unknown} not supported; use any of "
                                f"{sorted(REPORTERS)}, 'all' or 'none' (metrics.jsonl in output_dir is always written)")
    for name in report_to:
        if name in REPORTERS and not _installed(name):
            raise NotSupportedError(f"report_to includes {name!r}, which is not installed: pip install "
                                    f"{REPORTERS[name][1]} (or 'scaletrain[loggers]')")


def reporter_callbacks(report_to: list[str]) -> list:
    from transformers.integrations import MLflowCallback, TensorBoardCallback

    from .observers import WandbCallback

    made = {"wandb": WandbCallback, "tensorboard": TensorBoardCallback, "mlflow": MLflowCallback}
    return [made[name]() for name in report_to if name in made]
