"""Every launch script, run for real with 2 processes on the tiny recipe, each
with a different strategy; the SLURM script also in dry-run for 4 nodes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]


def launch(script: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 240):
    # a thread count inherited from the test process (libraries set one) is not the user's choice
    inherited = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full_env = {**inherited, "PYTHON": sys.executable, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
                "NPROC": "2", "MASTER_PORT": str(free_port()), **(env or {})}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_two_rank_run(out: Path, strategy: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"].startswith(f"{strategy} (world size 2"), summary["strategy"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert sum("eval_loss" in r for r in records) == 3  # steps 3 and 6, then the final evaluate()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(summary["final_model"])
    assert model.config.num_hidden_layers == 1


def test_torchrun_script_with_fsdp(tmp_path):
    launch("torchrun.sh", ["tiny-test", "--output_dir", str(tmp_path / "run"), "--strategy", "fsdp"], tmp_path)
    check_two_rank_run(tmp_path / "run", "fsdp")


@pytest.mark.parametrize("accelerate_config, strategy", [("ddp.yaml", "ddp"), ("fsdp.yaml", "fsdp")])
def test_accelerate_script_picks_the_strategy_from_the_accelerate_config(tmp_path, accelerate_config, strategy):
    # tiny-test says strategy: auto; the accelerate config decides
    launch("accelerate.sh", ["tiny-test", "--output_dir", str(tmp_path / "run")], tmp_path,
           env={"ACCELERATE_CONFIG": str(ROOT / "configs" / "accelerate" / accelerate_config)})
    check_two_rank_run(tmp_path / "run", strategy)


def test_deepspeed_launcher_script_with_zero2(tmp_path):
    launch("deepspeed.sh", ["tiny-test", "--output_dir", str(tmp_path / "run"), "--strategy", "zero2"], tmp_path)
    check_two_rank_run(tmp_path / "run", "zero2")


def _fake_slurm_tools(folder: Path, hosts: list[str]) -> Path:
    """srun that runs the per-node command here (one node), scontrol that expands the node list."""
    folder.mkdir()
    (folder / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    # the first host, then (after a pause, as a real scontrol may) the rest: a
    # reader that stops after one line would SIGPIPE it
    (folder / "scontrol").write_text(f"#!/usr/bin/env bash\necho {hosts[0]}\nsleep 0.3\n"
                                     f"printf '%s\\n' {' '.join(hosts[1:])}\n")
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod(0o755)
    return folder


def test_slurm_script_runs_one_torchrun_per_node(tmp_path):
    tools = _fake_slurm_tools(tmp_path / "bin", ["localhost"])
    slurm = {"PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_JOB_ID": "41", "GPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"}
    launch("slurm.sbatch", ["tiny-test", "--output_dir", str(tmp_path / "run"), "--strategy", "zero3"], tmp_path,
           env=slurm)
    check_two_rank_run(tmp_path / "run", "zero3")


@pytest.mark.parametrize("command", ["train", "hpo"])
def test_slurm_script_dry_run_for_four_nodes(tmp_path, command):
    tools = _fake_slurm_tools(tmp_path / "bin", ["gpu01", "gpu02", "gpu03", "gpu04"])
    proc = launch("slurm.sbatch", ["configs/fsdp.yaml", "--learning_rate", "3e-5"], tmp_path, env={
        "PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "SCALETRAIN_DRY_RUN": "1",
        "MASTER_PORT": "29500", **({"SCALETRAIN_COMMAND": command} if command != "train" else {}),
    })
    per_node = proc.stdout.splitlines()[2]
    assert "-m torch.distributed.run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d" in per_node
    resume = "--resume_from_checkpoint auto " if command == "train" else ""  # a requeued job continues
    expected = (f"--rdzv_endpoint gpu01:29500 --rdzv_id 77 -m scaletrain {command} configs/fsdp.yaml "
                f"{resume}--learning_rate 3e-5")
    assert expected in per_node
    assert proc.stdout.splitlines()[4].startswith("srun --nodes=4 --ntasks-per-node=1")
    assert "OMP_NUM_THREADS=8" in proc.stdout  # 64 cores / 8 ranks


def test_slurm_script_refuses_to_run_outside_an_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "tiny-test"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode != 0 and "not inside a SLURM allocation" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse_and_are_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# the strategy each shipped config must select (named by its file, except the LoRA recipes)
EXPECTED_STRATEGY = {"lora-smollm2": "ddp", "qlora-smollm2": "ddp", "hpo-trec": "ddp", "hsdp": "fsdp"}
# the SmolLM2 recipes run in full in test_recipes_smollm2.py, the search in benchmarks/hpo.py
CLASSIFICATION_CONFIGS = [c for c in CONFIGS if c.stem not in EXPECTED_STRATEGY]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_validate(config, monkeypatch):
    from scaletrain.args.run_config import load_config
    from scaletrain.parallel.environment import DistEnv
    from scaletrain.strategies import build_strategy

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(config, [])
    strategy = build_strategy(cfg.training, DistEnv(0, 2, 0, 2))
    assert strategy.name == EXPECTED_STRATEGY.get(config.stem, config.stem.split("-")[0])
    if "lora" in config.stem:
        assert cfg.training.lora["r"] == 16 and (cfg.training.quantization is not None) == config.stem.startswith("q")


def _accuracy_in_one_process(config: Path, overrides: list[str], model_dir: str) -> tuple[float, int]:
    """The saved final model's accuracy on the config's held-out rows, by a plain forward in this process."""
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    task = build_task(load_config(config, overrides))
    rows = task.eval_dataset
    collate = DataCollatorWithPadding(task.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = collate([rows[i] for i in range(start, min(start + 16, len(rows)))])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(rows), len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("config", CLASSIFICATION_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_train_with_two_processes(config, tmp_path):
    out = tmp_path / "run"
    overrides = ["--max_steps", "4", "--data.train_size", "128", "--data.eval_size", "64"]
    launch("torchrun.sh", [str(config), "--output_dir", str(out), *overrides], tmp_path, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"].startswith(f"{EXPECTED_STRATEGY.get(config.stem, config.stem.split('-')[0])} "
                                          "(world size 2")
    # the 2-rank evaluation saw each of the 64 held-out rows once and scored them as one process scores the
    # saved model (fp32 logits of 2 ranks vs 1 may differ in the last bits: one near-tie may flip)
    accuracy, rows = _accuracy_in_one_process(config, overrides, summary["final_model"])
    assert rows == summary["eval_samples"] == 64
    assert abs(summary["eval_accuracy"] - accuracy) * rows <= 1, (summary["eval_accuracy"], accuracy)


def _two_nodes(args: list[str], cwd: Path, port: int, run_id: str) -> None:
    """launch/torchrun.sh on two "nodes" of this machine (2 ranks each), rendezvousing over c10d as two
    hosts would; c10d orders the nodes by when they join, whatever --node_rank says."""
    inherited = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env = {**inherited, "PYTHON": sys.executable, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1", "NPROC": "2",
           "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RUN_ID": run_id}
    nodes = [subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-5000:]


@pytest.mark.slow
def test_two_torchrun_nodes_train_hsdp_and_resume(tmp_path):
    """configs/hsdp.yaml on 2 nodes x 2 ranks: FSDP2 shards inside each node and replicates across them; the
    job is stopped after a checkpoint and a new launch of both nodes continues from it."""
    out = tmp_path / "run"
    common = [str(ROOT / "configs" / "hsdp.yaml"), "--output_dir", str(out), "--data.train_size", "96",
              "--data.eval_size", "32", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no",
              "--logging_steps", "1", "--per_device_train_batch_size", "4"]
    _two_nodes([*common, "--max_steps", "3"], tmp_path, free_port(), "first")
    manifest = json.loads((out / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["layout"] == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "sp": 1, "tp": 1}
    assert manifest["world_size"] == 4
    _two_nodes([*common, "--max_steps", "6", "--resume_from_checkpoint", "latest"], tmp_path, free_port(), "second")
    summary = json.loads((out / "summary.json").read_text())
    assert "2 dp_replicate x 2 dp_shard" in summary["strategy"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the second launch logged steps 4-6 after the first's 1-3
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
