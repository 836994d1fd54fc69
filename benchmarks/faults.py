"""Fault soak: a real recipe under `launch/torchrun.sh` with MAX_RESTARTS, its workers SIGKILLed at random
times (one kill while a checkpoint is being written) and one preemption (SIGTERM to every worker), against
the same recipe run without faults. Reports faults survived, steps recomputed, time lost per fault, and
whether the final exported weights are bit-identical; writes a table, JSON and a timeline PNG.

    python benchmarks/faults.py [--strategies ddp,fsdp,zero3] [--kills 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from strategies import publish, save_plot  # noqa: E402

ROOT = Path(__file__).parent.parent
# configs/ddp.yaml's MiniLM on TREC, shortened: 60 optimizer steps, a checkpoint every 10
RUN = ["--max_steps", "60", "--save_strategy", "steps", "--save_steps", "10", "--save_total_limit", "2",
       "--logging_steps", "1",
       "--eval_strategy", "no", "--data.train_size", "2000", "--data.eval_size", "200"]


def launch(out: Path, strategy: str, restarts: int) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "NPROC": "2", "PYTHON": sys.executable,
           "MAX_RESTARTS": str(restarts)}
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ROOT / "configs" / "ddp.yaml"), "--output_dir",
           str(out), "--strategy", strategy, *RUN]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"),
                            start_new_session=True)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "torch.distributed.run" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # it exited meanwhile (a restart is under way)
            continue
    return found


def latest_step(out: Path) -> int | None:
    """The step of the newest line in metrics.jsonl: it falls back after a restart resumes earlier."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step"))
        except (ValueError, TypeError):
            continue
    return None


class Soak:
    def __init__(self, out: Path, strategy: str, kills: int, rng: random.Random) -> None:
        self.out, self.strategy, self.kills, self.rng = out, strategy, kills, rng
        self.timeline: list[tuple[float, int]] = []
        self.events: list[dict] = []
        self.start = 0.0

    def now(self) -> float:
        return time.monotonic() - self.start

    def run(self) -> float:
        self.start = time.monotonic()
        proc = launch(self.out, self.strategy, restarts=self.kills + 1)
        plan = ["kill-in-save"] + ["kill"] * (self.kills - 1) + ["sigterm"]
        self.rng.shuffle(plan)
        for fault in plan:
            self._wait_training(proc, min_steps=self.rng.randint(3, 12))
            self._inject(proc, fault)
        while proc.poll() is None:
            self._sample()
            time.sleep(0.2)
        if proc.returncode != 0:
            raise SystemExit(f"{self.strategy}: the faulted run failed ({proc.returncode}); see {self.out}.log")
        return self.now()

    def _sample(self) -> None:
        step = latest_step(self.out)
        if step is not None and (not self.timeline or self.timeline[-1][1] != step):
            self.timeline.append((self.now(), step))

    def _wait_training(self, proc: subprocess.Popen, min_steps: int) -> None:
        """Until the (restarted) workers have trained min_steps steps past where they started."""
        first = None
        while proc.poll() is None:
            self._sample()
            step = latest_step(self.out)
            if step is not None and len(workers(proc)) == 2:
                first = step if first is None else first
                if step - first >= min_steps:
                    return
            time.sleep(0.1)

    def _inject(self, proc: subprocess.Popen, fault: str) -> None:
        if proc.poll() is not None:
            return
        if fault == "kill-in-save":  # wait for a save before the last one to be under way, then kill inside it
            deadline = time.monotonic() + 60
            while not [p for p in self.out.glob("checkpoint-*.tmp") if p.name != "checkpoint-60.tmp"] \
                    and time.monotonic() < deadline and proc.poll() is None:
                self._sample()
                time.sleep(0.005)
        ranks = workers(proc)
        step = latest_step(self.out)
        if not ranks:
            return
        try:
            if fault == "sigterm":
                for p in ranks:
                    p.send_signal(signal.SIGTERM)
            else:
                self.rng.choice(ranks).kill()
        except psutil.Error:
            return  # the worker ended just now: no fault injected
        self.events.append({"t": round(self.now(), 2), "fault": fault, "step": step})


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def soak(strategy: str, kills: int, seed: int, work: Path) -> dict:
    import torch

    ref, faulted = work / f"{strategy}-reference", work / f"{strategy}-faults"
    for path in (ref, faulted):
        shutil.rmtree(path, ignore_errors=True)
    start = time.monotonic()
    proc = launch(ref, strategy, restarts=0)
    if proc.wait() != 0:
        raise SystemExit(f"{strategy}: the reference run failed; see {ref}.log")
    reference_s = time.monotonic() - start
    run = Soak(faulted, strategy, kills, random.Random(seed))
    faulted_s = run.run()
    a, b = final_weights(ref), final_weights(faulted)
    bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    faults = len(run.events)
    return {"strategy": strategy, "faults": faults, "survived": True, "bitwise": bitwise,
            "reference_s": round(reference_s, 1), "faulted_s": round(faulted_s, 1),
            "lost_per_fault_s": round((faulted_s - reference_s) / max(1, faults), 1),
            "steps_recomputed": _recomputed(faulted), "resumes": _resumes(faulted.with_suffix(".log")),
            "events": run.events, "timeline": run.timeline}


def _resumes(log: Path) -> list[str]:
    """The checkpoint each restarted run resumed from (rank 0's log line)."""
    return [line.split("resumed from ", 1)[1].split(" at step")[0].rsplit("/", 1)[-1]
            for line in log.read_text(errors="replace").splitlines() if "resumed from " in line]


def _recomputed(out: Path) -> int:
    """Steps trained more than once: every incarnation appends its per-step logs to metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [e["step"] for e in lines if "loss" in e and "train_loss" not in e]
    return len(trained) - len(set(trained))


def plot(results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(8, 2.4 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        ax.plot([t for t, _ in r["timeline"]], [s for _, s in r["timeline"]], drawstyle="steps-post")
        for event in r["events"]:
            ax.axvline(event["t"], color="red" if event["fault"] != "sigterm" else "orange", linestyle="--")
            ax.text(event["t"], 2, event["fault"], rotation=90, fontsize=7)
        ax.axvline(r["reference_s"], color="gray", linestyle=":")
        ax.set_title(f"{r['strategy']}: {r['faults']} faults, bitwise equal: {r['bitwise']}", fontsize=9)
        ax.set_ylabel("step")
    axes[-1, 0].set_xlabel("seconds (gray: the run without faults ended)")
    return save_plot(figure, "faults-cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="ddp,fsdp,zero3")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="outputs/bench-faults")
    cli = parser.parse_args()
    work = Path(cli.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [soak(s, cli.kills, cli.seed, work) for s in cli.strategies.split(",")]
    lines = [f"# Fault soak, {platform.node()} (CPU, 2 gloo ranks), configs/ddp.yaml for 60 steps, "
             f"{cli.kills} SIGKILLs (one inside a save) + 1 SIGTERM per run, seed {cli.seed}", "",
             "| strategy | faults | survived | resumed from | steps recomputed | run without faults s | "
             "with faults s | lost per fault s | final weights bitwise equal |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['strategy']} | {r['faults']} | {'yes' if r['survived'] else 'no'} | "
                     f"{', '.join(r['resumes']) or '-'} | {r['steps_recomputed']} | {r['reference_s']} | "
                     f"{r['faulted_s']} | {r['lost_per_fault_s']} | {'yes' if r['bitwise'] else 'NO'} |")
    lines += ["", "Faults in order (seconds into the run, the step logged last): " + "; ".join(
        f"{r['strategy']}: " + ", ".join(f"{e['fault']} at {e['t']} s (step {e['step']})" for e in r["events"])
        for r in results)]
    publish("faults-cpu", lines, {"results": results})
    print(f"plot: {plot(results)}")


if __name__ == "__main__":
    main()
