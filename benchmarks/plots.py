"""PNG plots beside the tables of strategies.py, memory.py and checkpoint.py, drawn from their JSON results
(each benchmark calls its plot after writing the JSON; `python benchmarks/plots.py` redraws all three
from the results on disk)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from strategies import RESULTS, save_plot  # noqa: E402


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_strategies(data: dict) -> Path:
    """Throughput and model state per rank, per strategy and world size."""
    plt = _pyplot()
    rows = data["rows"]
    labels = [f"{r['strategy']} x{r['world_size']}" for r in rows]
    figure, (speed, state) = plt.subplots(1, 2, figsize=(11, 3.8))
    speed.bar(range(len(rows)), [r["samples_per_s"] for r in rows], color="tab:blue")
    speed.set_ylabel("samples/s")
    state.bar(range(len(rows)), [r["state_mib_per_rank"] for r in rows], color="tab:green")
    state.set_ylabel("model state MiB per rank")
    for axes in (speed, state):
        axes.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
    figure.suptitle(f"Strategies ({data['device']})", fontsize=10)
    return save_plot(figure, "strategies-cpu")


def plot_memory(data: dict) -> Path:
    """Measured per-rank memory against `scaletrain estimate`'s prediction."""
    plt = _pyplot()
    names = list(data["strategies"])
    measured = [data["strategies"][n]["step_peak"] / 2**20 for n in names]
    predicted = [data["strategies"][n]["predicted_total"] / 2**20 for n in names]
    figure, axes = plt.subplots(figsize=(7, 3.8))
    x = range(len(names))
    axes.bar([i - 0.2 for i in x], measured, width=0.4, label="measured step peak")
    axes.bar([i + 0.2 for i in x], predicted, width=0.4, label="scaletrain estimate")
    axes.set_xticks(list(x), [f"{n} x{data['strategies'][n]['world_size']}" for n in names])
    axes.set_ylabel("MiB per rank")
    axes.set_title(f"Memory per rank vs the estimate ({data['device']})", fontsize=10)
    axes.legend()
    return save_plot(figure, "memory-cpu")


def plot_checkpoint(data: dict) -> Path:
    """How long training waits for a save, synchronous vs asynchronous, per strategy."""
    plt = _pyplot()
    rows = data["rows"]
    keys = sorted({(r["strategy"], r["ranks"]) for r in rows}, key=lambda k: (k[1], k[0]))
    wait = {(r["strategy"], r["ranks"], r["mode"]): r["save_blocking_s"] for r in rows}
    modes = sorted({r["mode"] for r in rows})
    figure, axes = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        axes.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(keys))],
                 [wait.get((s, n, mode), 0.0) for s, n in keys], width=width, label=mode)
    axes.set_xticks(range(len(keys)), [f"{s} x{n}" for s, n in keys])
    axes.set_ylabel("training blocked per save, s")
    axes.set_title(f"Checkpoint wait, sync vs async ({data['device']})", fontsize=10)
    axes.legend()
    return save_plot(figure, "checkpoint-cpu")


PLOTS = {"strategies-cpu": plot_strategies, "memory-cpu": plot_memory, "checkpoint-cpu": plot_checkpoint}

if __name__ == "__main__":
    for name, plot in PLOTS.items():
        print(plot(json.loads((RESULTS / f"{name}.json").read_text())))
