"""What a newcomer's first run prints: the demo's path (the trec-minilm recipe through torchrun, as
`make demo` launches it) on 2 ranks, a few steps, with every line it writes read back. One voice: the
main process prints the progress and the summary, the other rank only warnings; no optional package
speaks at import, and DDP does not warn about the unused-parameter search."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# third-party lines a plain fine-tune used to print, and what each was about
NOISE = {
    "Failed to load CPU gemm_4bit_forward": "bitsandbytes imported by peft at transformers' import",
    "torchao/_C": "torchao's CUDA kernels, which a CPU torch cannot load, at transformers' import",
    "is an Enum subclass and is now natively supported": "torchao registering its enums with torch's pytree",
    "find_unused_parameters=True was specified": "DDP's per-step unused-parameter traversal",
    "Setting accelerator to CPU": "DeepSpeed detecting the accelerator at the final save",
    "LOAD REPORT": "transformers' load report, once per rank",
    "Setting OMP_NUM_THREADS environment variable": "torchrun choosing threads per rank",
    "Loading weights": "transformers' weight-loading bar",
    "Writing model shards": "transformers' shard-writing bar",
}


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = subprocess.run(["make", "-s", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert re.search(r"OMP_NUM_THREADS=\d+ .*torchrun", threads.stdout), threads.stdout  # as make demo sets it
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "scaletrain",
               "train", "trec-minilm", "--max_steps", "3", "--data.train_size", "96", "--data.eval_size", "40",
               "--output_dir", str(out / "run")]
    proc = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=400,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout, proc.stderr


def test_no_third_party_noise(demo_output):
    printed = "\n".join(demo_output)
    heard = {text: why for text, why in NOISE.items() if text in printed}
    assert not heard, f"the first run printed {heard}:\n{printed[-4000:]}"


def test_the_replica_says_nothing_but_warnings_and_the_main_process_says_the_rest(demo_output):
    stdout, stderr = demo_output
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    replica = [line for line in lines if line.startswith("[rank1]")]
    assert all(re.match(r"\[rank1\] (WARNING|ERROR|CRITICAL) ", line) for line in replica), replica
    assert stdout.count("=== scaletrain run summary ===") == 1
    assert any(line.startswith("[rank0] INFO scaletrain.trainer.trainer: training with ddp") for line in lines)
    # data preparation shows once: each split's tokenizing bar starts on one rank only, and completes (tqdm may
    # draw its last state twice, at the final update and again at close, with a refreshed rate)
    for split, rows in (("train", 96), ("validation", 40)):
        assert len(re.findall(rf"tokenizing {split}:   0%\|[^|]*\| 0/{rows}", stderr)) == 1, stderr[-3000:]
        assert re.search(rf"tokenizing {split}: 100%\|[^|]*\| {rows}/{rows}", stderr), stderr[-3000:]
    assert len(re.findall(r"train: 100%\|[^|]*\| 3/3", stderr)) == 1  # one training bar, finished


def test_the_expected_new_head_is_one_line_not_a_warning(demo_output):
    _, stderr = demo_output
    head = [line for line in stderr.splitlines() if "new task head" in line]
    assert head == ["[rank0] INFO scaletrain.tasks.models: BertForSequenceClassification: new task head "
                    "classifier, initialised at random (not in the checkpoint)"]
