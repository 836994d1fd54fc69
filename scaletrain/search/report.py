"""What a finished search leaves in output_dir (rank 0): trials.csv and trials.json, PNG plots made by
optuna's matplotlib visualisation, a table for the console, and (on request) only the best checkpoint."""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .study import retried_numbers

logger = logging.getLogger(__name__)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    rows = []
    for t in trials:
        rows.append({
            "number": t.number, "state": t.state.name, "retried": t.number in retried,
            "values": t.values, "params": t.params,
            "steps": t.user_attrs.get("global_step"),
            "intermediate_values": {int(k): v for k, v in t.intermediate_values.items()},
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            **{k: t.user_attrs.get(k) for k in ("run_dir", "best_checkpoint", "last_checkpoint", "resumed_from",
                                                    "error")},
        })
    return rows


def write_report(study: optuna.Study, output_dir: str, best_number: int) -> dict[str, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"trials.json": out / "trials.json", "trials.csv": out / "trials.csv"}
    written["trials.json"].write_text(json.dumps({"study_name": study.study_name, "directions": [
        d.name.lower() for d in study.directions], "best_trial": best_number, "trials": trial_rows(study)},
        indent=2, default=str))
    study.trials_dataframe().to_csv(written["trials.csv"], index=False)
    written.update(_plots(study, out))
    return written


def _plots(study: optuna.Study, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = {"optimization_history.png": vis.plot_optimization_history,
             "intermediate_values.png": vis.plot_intermediate_values,
             "parallel_coordinate.png": vis.plot_parallel_coordinate,
             "param_importances.png": vis.plot_param_importances}
    if len(study.directions) > 1:
        plots = {"pareto_front.png": vis.plot_pareto_front}
    written = {}
    for name, plot in plots.items():
        if name == "param_importances.png" and (len(complete) < 2 or not _varied_params(complete)):
            continue  # importances need two finished trials whose parameters differ
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.tight_layout()
            figure.savefig(out / name, dpi=110)
            plt.close(figure)
            written[name] = out / name
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. no intermediate values reported
            logger.info("no %s: %s", name, exc)
    return written


def _varied_params(trials: list[FrozenTrial]) -> bool:
    return any(len({repr(t.params.get(name)) for t in trials}) > 1 for name in trials[0].params)


def format_table(study: optuna.Study, best_number: int) -> str:
    rows = trial_rows(study)
    names = sorted({k for r in rows for k in r["params"]})
    header = ["trial", "state", "objective", "steps"] + names
    lines = [header]
    for r in rows:
        values = r["values"]
        objective = "-" if values is None else ", ".join(f"{v:.5g}" for v in values)
        state = r["state"].lower() + (" (retried)" if r["retried"] else "")
        mark = "*" if r["number"] == best_number else ""
        lines.append([f"{r['number']}{mark}", state, objective, str(r["steps"] if r["steps"] is not None else "-")]
                     + [_short(r["params"].get(n)) for n in names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def keep_only_best(study: optuna.Study, best_number: int) -> list[Path]:
    """Delete every trial's checkpoints but the best trial's best (or last) one; the trials' logs stay."""
    removed = []
    for t in study.get_trials(deepcopy=False):
        run_dir = t.user_attrs.get("run_dir")
        if not run_dir or t.state == TrialState.RUNNING or not Path(run_dir).is_dir():
            continue
        keep = t.user_attrs.get("best_checkpoint") or t.user_attrs.get("last_checkpoint") \
            if t.number == best_number else None
        for child in Path(run_dir).iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-") and str(child) != keep:
                shutil.rmtree(child)
                removed.append(child)
    return removed
