"""backend='ray' for real: Ray Tune trials in Ray worker processes (one Ray session for every search, in
tests/scripts/ray_search_job.py). The same grid gives the HF Trainer's objectives; ASHA stops trials
early; a trial whose worker dies is restarted by Ray from the checkpoint it reported and ends where an
uninterrupted run ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.tune")

SCRIPT = Path(__file__).parent / "scripts" / "ray_search_job.py"


@pytest.fixture(scope="module")
def searches(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ray")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), RAY_DEDUP_LOGS="0")
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "grid:hf", "grid:ours", "asha", "restart"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            results[result["search"]] = result
    assert done.returncode == 0 and len(results) == 4, done.stdout[-3000:] + done.stderr[-5000:]
    results["out"] = out
    return results


def _by_config(result: dict) -> dict:
    return {(t["config"]["learning_rate"], t["config"]["num_train_epochs"]): t for t in result["trials"]}


def test_ray_grid_gives_the_hf_trainers_objectives_and_trains_each_point_with_its_values(searches):
    hf, ours = _by_config(searches["grid-hf"]), _by_config(searches["grid-ours"])
    assert sorted(ours) == sorted(hf) and len(ours) == 6  # the whole grid, once
    for config, trial in ours.items():
        assert trial["status"] == hf[config]["status"] == "TERMINATED"
        np.testing.assert_allclose(trial["objective"], hf[config]["objective"], rtol=1e-5)
        assert trial["iterations"] == hf[config]["iterations"] == config[1]  # a report per epoch's evaluation
        begin = trial["records"][0]  # what the trial's trainer really ran with, in its Ray worker
        assert (begin["learning_rate"], begin["num_train_epochs"]) == config
        assert trial["checkpoints"] == [f"checkpoint-{s}" for s in range(1, config[1] + 1)]
    assert {r["pid"] for t in ours.values() for r in t["records"] if "pid" in r} - {os.getpid()}
    best_hf, best_ours = searches["grid-hf"]["best"], searches["grid-ours"]["best"]
    assert best_ours[2] == best_hf[2] and best_ours[1] == pytest.approx(best_hf[1], rel=1e-5)
    assert best_ours[1] == min(t["objective"] for t in ours.values())
    table = json.loads((searches["out"] / "grid-ours" / "trials.json").read_text())
    assert table["backend"] == "ray" and table["best_trial"] == best_ours[0] and len(table["trials"]) == 6


def test_asha_stops_the_worse_trials_after_their_first_evaluation(searches):
    trials = {t["config"]["learning_rate"]: t for t in searches["asha"]["trials"]}
    evaluations = {lr: [r["eval_step"] for r in t["records"] if "eval_step" in r] for lr, t in trials.items()}
    assert evaluations[0.002] == [1, 2, 3, 4, 5, 6]  # the first trial sets the bar and runs to the end
    stopped = [lr for lr, steps in evaluations.items() if steps == [1]]
    assert stopped, evaluations  # a worse trial ends at the first rung instead of training 6 steps
    for lr in stopped:
        assert trials[lr]["objective"] > trials[0.002]["records"][1]["eval_loss"]


def test_a_trial_whose_worker_died_resumes_from_its_reported_checkpoint_and_ends_as_if_uninterrupted(searches):
    result = searches["restart"]
    (trial,) = result["trials"]
    starts = [r for r in trial["records"] if "start_step" in r]
    assert [s["start_step"] for s in starts] == [0, 1]  # step 2's checkpoint was never reported: Ray had step 1's
    assert starts[0]["pid"] != starts[1]["pid"]  # a new worker
    evals = [r["eval_loss"] for r in trial["records"] if "eval_loss" in r]
    assert evals[1] == evals[2]  # step 2 evaluated before the crash and again after the resume: bitwise
    resumed = evals[2:]
    np.testing.assert_allclose(resumed, result["reference_eval_losses"][1:], rtol=1e-6)
    assert result["best"][1] == pytest.approx(result["reference_eval_losses"][-1], rel=1e-6)
