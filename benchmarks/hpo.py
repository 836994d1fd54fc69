"""Hyperparameter search with and without Hyperband pruning, on the real task: all-MiniLM-L6-v2 on TREC
(configs/hpo-trec.yaml: 1,024 training questions, 500 held out, 64 steps per full trial, an evaluation
every 16). Both searches run 12 trials with the same TPE seed, one after the other, in one process each
(`scaletrain hpo`); the table gives the best held-out accuracy, wall time, and the optimizer steps trained.

    python benchmarks/hpo.py [--trials 12]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from strategies import RESULTS, publish, save_plot  # noqa: E402

CONFIG = Path(__file__).parent.parent / "configs" / "hpo-trec.yaml"


def search(name: str, pruner: str | None, trials: int, work: Path) -> dict:
    """`scaletrain hpo` on the config; pruner None keeps the config's Hyperband."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "scaletrain", "hpo", str(CONFIG), "--output_dir", str(out), "--storage",
           f"sqlite:///{out}/study.db", "--study_name", name, "--n_trials", str(trials)]
    cmd += ["--pruner", pruner] if pruner else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    table = json.loads((out / "trials.json").read_text())
    rows = table["trials"]
    best = next(r for r in rows if r["number"] == table["best_trial"])
    for plot in out.glob("*.png"):
        shutil.copy(plot, RESULTS / f"hpo-{name}-{plot.name}")
    return {"name": name, "pruner": pruner or "hyperband (min 16, max 64 steps, factor 2)",
            "wall_s": round(wall, 1), "best_accuracy": best["values"][0],
            "best_params": best["params"], "steps_trained": sum(r["steps"] or 0 for r in rows),
            "states": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "trials": [{"number": r["number"], "state": r["state"], "values": r["values"], "params": r["params"],
                        "steps": r["steps"], "duration_s": r["duration_s"]} for r in rows]}


def plot(results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        elapsed, best, shown = 0.0, 0.0, []
        for trial in result["trials"]:
            elapsed += trial["duration_s"] or 0.0
            if trial["state"] == "COMPLETE":
                best = max(best, trial["values"][0])
            shown.append((elapsed, best))
        ax.step([e for e, _ in shown], [b for _, b in shown], where="post", marker="o",
                label=f"{result['name']} ({result['wall_s']:.0f} s)")
    ax.set_xlabel("time in trials (s)")
    ax.set_ylabel("best held-out accuracy so far")
    ax.set_title("TPE search on MiniLM/TREC, 12 trials: with and without Hyperband")
    ax.legend()
    return save_plot(figure, "hpo-cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--work", default="outputs/bench-hpo")
    cli = parser.parse_args()
    work = Path(cli.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [search("no-pruning", "none", cli.trials, work), search("hyperband", None, cli.trials, work)]
    full, pruned = results
    lines = [f"# Hyperparameter search, {platform.node()} ({platform.processor() or platform.machine()}, CPU), "
             f"{cli.trials} trials, TPE seed 0", "",
             "| search | wall s | best accuracy | complete | pruned | optimizer steps trained |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {r['best_accuracy']:.4f} | {r['states']['COMPLETE']} | "
                     f"{r['states']['PRUNED']} | {r['steps_trained']} |")
    lines += ["", f"Hyperband / no pruning: wall time {pruned['wall_s'] / full['wall_s']:.2f}x, steps trained "
              f"{pruned['steps_trained'] / full['steps_trained']:.2f}x, best accuracy "
              f"{pruned['best_accuracy'] - full['best_accuracy']:+.4f}.",
              f"Best (no pruning): {full['best_params']}", f"Best (Hyperband): {pruned['best_params']}"]
    publish("hpo-cpu", lines, {"results": results})
    print(f"plot: {plot(results)}")


if __name__ == "__main__":
    main()
