"""save_on_each_node on two real nodes without a shared filesystem: two torchrun agents (one process each,
node ranks 0 and 1) on this machine, each in a working directory of its own, so the relative output_dir is
a different folder per node, as two hosts' local disks would be. Each node must hold whole checkpoints and
the exported model, and resume from its own copy to the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port
from scaletrain import NotSupportedError, TrainingArguments
from scaletrain.checkpoint.manager import COMMIT_MARKER

BIN = Path(sys.executable).parent


def _two_nodes(root: Path, *overrides: str) -> list[str]:
    """`scaletrain train tiny-test` on 2 nodes x 1 process; returns each node's stderr."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cwd = root / f"node{node}"
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "scaletrain", "train", "tiny-test",
               "--output_dir", "out", "--strategy", "ddp", "--save_on_each_node", "true", "--save_steps", "2",
               "--eval_strategy", "no", "--optim", "adamw_torch",
               # constant: a run to step 4 continued to 6 then follows the schedule of a run straight to 6
               "--lr_scheduler_type", "constant", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, stdin=subprocess.DEVNULL))
    outputs = [p.communicate(timeout=300) for p in procs]
    for node, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"node {node} failed ({proc.returncode}):\n{err[-4000:]}"
    return [err for _, err in outputs]


CLOCKED = ("per_second", "runtime", "tflops", "mfu")  # rates from each rank's own clock


def _files(checkpoint: Path) -> dict[str, bytes]:
    return {str(p.relative_to(checkpoint)): p.read_bytes() for p in sorted(checkpoint.rglob("*")) if p.is_file()}


def test_each_node_writes_whole_checkpoints_and_resumes_from_its_own(tmp_path):
    _two_nodes(tmp_path / "run", "--max_steps", "4")
    outs = [tmp_path / "run" / f"node{n}" / "out" for n in (0, 1)]
    for out in outs:
        assert sorted(p.name for p in out.glob("checkpoint-*") if (p / COMMIT_MARKER).is_file()) == \
            ["checkpoint-2", "checkpoint-4"]
        assert (out / "final" / "model.safetensors").is_file()
    node0, node1 = (_files(out / "checkpoint-4") for out in outs)
    # the same whole state on each disk; each rank's RNG file on its own node
    shared = {k for k in node0 if not k.startswith("rng_state_")}
    assert shared == {k for k in node1 if not k.startswith("rng_state_")}
    assert "rng_state_0.pth" in node0 and "rng_state_1.pth" in node1 and "rng_state_1.pth" not in node0
    # the whole model and optimizer (a DDP run's state is HF's files); the manifest holds its creation time,
    # every data byte is equal
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt"} <= shared
    for name in shared - {"manifest.json", "trainer_state.json"}:
        assert node0[name] == node1[name], name
    states = [json.loads(files["trainer_state.json"]) for files in (node0, node1)]
    assert [s.pop("is_world_process_zero") for s in states] == [True, False]  # who wrote it
    for state in states:  # each rank's own clock
        state["log_history"] = [{k: v for k, v in e.items() if not any(t in k for t in CLOCKED)}
                                for e in state["log_history"]]
    assert states[0] == states[1]

    errors = _two_nodes(tmp_path / "run", "--max_steps", "6", "--resume_from_checkpoint", "auto")
    assert "checkpoint-4" in errors[0]  # rank 0 logs the resume; node 1 found its own copy (or it would
    # have started afresh, and its weights below would differ)
    _two_nodes(tmp_path / "whole", "--max_steps", "6")
    reference = load_file(str(tmp_path / "whole" / "node0" / "out" / "final" / "model.safetensors"))
    for out in outs:
        resumed = load_file(str(out / "final" / "model.safetensors"))
        for name, value in reference.items():
            assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize("overrides, why", [({"strategy": "fsdp"}, "a sharded checkpoint holds every rank's"),
                                            ({"strategy": "zero2"}, "a sharded checkpoint holds every rank's"),
                                            ({"save_async": True}, "written synchronously")])
def test_save_on_each_node_is_refused_where_a_node_cannot_hold_a_whole_checkpoint(tmp_path, overrides, why):
    with pytest.raises(NotSupportedError, match=why):
        TrainingArguments(output_dir=str(tmp_path), save_on_each_node=True, **overrides)
