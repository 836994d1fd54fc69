"""`scaletrain hpo CONFIG`: a search from the YAML's search section under torchrun, the best trial's
checkpoint exported, and bad search sections refused with exit code 2 before anything starts."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaletrain.cli import main

BIN = Path(sys.executable).parent
TINY = {
    "model": {"name_or_path": "minilm", "dropout": 0.0,
              "config_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                   "num_attention_heads": 2}},
    "data": {"dataset": "trec", "max_length": 32, "train_size": 64, "eval_size": 30},
    "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 2, "eval_strategy": "steps",
                 "eval_steps": 2, "save_steps": 2, "disable_tqdm": True, "seed": 7, "ddp_timeout": 120},
    "search": {"n_trials": 4, "metric": "eval_accuracy", "direction": "maximize", "sampler": "grid",
               "keep_best_trial_only": True,
               "parameters": {"learning_rate": [1.0e-3, 3.0e-2], "model.dropout": [0.0, 0.2]}},
}


def _config(tmp_path: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    config["training"]["output_dir"] = str(tmp_path / "out")
    for section, values in changes.items():
        config[section].update(values)
    path = tmp_path / "hpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_hpo_under_torchrun_searches_the_grid_and_exports_the_best_trial(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "scaletrain", "hpo",
           str(_config(tmp_path))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    grid = {(float(r["params_learning_rate"]), float(r["params_model.dropout"])) for r in rows}
    assert grid == {(1e-3, 0.0), (1e-3, 0.2), (3e-2, 0.0), (3e-2, 0.2)} and len(rows) == 4
    assert proc.stdout.count("=== scaletrain search summary ===") == 1  # rank 0 reports
    table = json.loads((out / "trials.json").read_text())
    best = next(t for t in table["trials"] if t["number"] == table["best_trial"])
    assert best["values"][0] == max(t["values"][0] for t in table["trials"])
    # only the best trial's best (here: last) checkpoint is kept
    assert sorted(p.relative_to(out) for p in out.glob("run-*/checkpoint-*")) == \
        [Path(best["run_dir"]).relative_to(out) / "checkpoint-4"]
    export = f"scaletrain export {best['run_dir']}/checkpoint-4 {out}/best-model"
    assert export in proc.stdout
    done = subprocess.run([str(BIN / "scaletrain"), "export", f"{best['run_dir']}/checkpoint-4", str(out / "best")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads((out / "best" / "config.json").read_text())
    assert exported["hidden_dropout_prob"] == best["params"]["model.dropout"]  # the trial's model, as trained


@pytest.mark.parametrize("search, message", [
    ({"parameters": {"learning_rat": [1e-3]}}, "'learning_rat' is not a training field nor model.<field>; "
                                               "did you mean 'learning_rate'?"),
    ({"parameters": {"data.max_length": [16, 32]}}, "data is prepared once for every trial"),
    ({"parameters": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}},
     "search.sampler grid needs a finite set of values per parameter"),
    ({"parameters": {}}, "search.parameters is empty"),
    ({"metric": "eval_acuracy"}, "evaluation never produces it"),
    ({"sampler": "tpe", "pruner": "hyperband", "metric": "eval_loss", "direction": "minimize"},
     "training.eval_strategy is 'no'"),
    ({"sampler": "annealing"}, "search.sampler='annealing': choose one of"),
])
def test_hpo_refuses_a_bad_search_section_before_starting(tmp_path, capsys, search, message):
    training = {"eval_strategy": "no"} if "pruner" in search else {}
    config = _config(tmp_path, search=search, training=training)
    assert main(["hpo", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
