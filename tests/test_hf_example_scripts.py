"""An HF example-style script (tests/scripts/) runs with scaletrain after changing its import only, in one
process and on 2 ranks, and writes what the HF Trainer writes for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port

BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).parent / "scripts" / "hf_style_text_classification.py"
# scaletrain's own additions (see README): the JSONL metrics stream and a readable copy of the arguments
OUR_EXTRA_FILES = {"metrics.jsonl", "training_args.json"}
OUR_EXTRA_METRICS = {"train_tokens_per_second"}


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                        num_attention_heads=2, max_position_embeddings=16, num_labels=2)
    folder = tmp_path_factory.mktemp("bert-classifier")
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def _run(library: str, out: Path, model: str, ranks: int = 1) -> subprocess.CompletedProcess:
    args = ["--model_name_or_path", model, "--output_dir", str(out), "--do_train", "--do_eval", "--do_predict",
            "--per_device_train_batch_size", str(8 // ranks), "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "2", "--report_to", "none",
            "--use_cpu", "--seed", "3", "--disable_tqdm", "true"]
    env = {**os.environ, "TRAINER_LIBRARY": library, "OMP_NUM_THREADS": "1"}
    launch = [str(BIN / "python")] if ranks == 1 else [str(BIN / "torchrun"), f"--nproc_per_node={ranks}",
                                                       f"--master_port={free_port()}"]
    proc = subprocess.run(launch + [str(SCRIPT)] + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _outputs(out: Path) -> dict:
    return {"files": {p.name for p in out.iterdir()},
            **{name: json.loads((out / name).read_text())
               for name in ("all_results.json", "train_results.json", "eval_results.json", "predict_results.json",
                            "trainer_state.json")},
            "predictions": (out / "predict_results.txt").read_text().splitlines(),
            "card": (out / "README.md").read_text()}


def _hyperparameters(card: str) -> list[str]:
    section = card.split("### Training hyperparameters", 1)[1].split("###", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) >= 6, card
    return lines


@pytest.fixture(scope="module")
def hf_outputs(tmp_path_factory, classifier_folder) -> dict:
    out = tmp_path_factory.mktemp("hf")
    _run("transformers", out, classifier_folder)
    return _outputs(out)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_script_writes_what_the_hf_trainer_writes(tmp_path, classifier_folder, hf_outputs, ranks):
    proc = _run("scaletrain", tmp_path, classifier_folder, ranks)
    ours = _outputs(tmp_path)
    assert ours["files"] == hf_outputs["files"] | OUR_EXTRA_FILES
    for name in ("all_results.json", "train_results.json", "eval_results.json", "predict_results.json"):
        assert set(ours[name]) == set(hf_outputs[name]) | (OUR_EXTRA_METRICS & set(ours[name])), name
    assert ours["all_results.json"]["train_samples"] == hf_outputs["all_results.json"]["train_samples"] == 64
    assert ours["all_results.json"]["epoch"] == hf_outputs["all_results.json"]["epoch"] == 2.0
    assert set(ours["trainer_state.json"]) == set(hf_outputs["trainer_state.json"])
    assert len(ours["predictions"]) == len(hf_outputs["predictions"]) == 33  # do_predict: a header and 32 rows
    # FLOPs are HF's estimate from the tokens seen: the same whatever the number of ranks
    assert ours["trainer_state.json"]["total_flos"] == hf_outputs["trainer_state.json"]["total_flos"] > 0
    assert ours["trainer_state.json"]["global_step"] == hf_outputs["trainer_state.json"]["global_step"] == 16
    if ranks == 1:
        assert _hyperparameters(ours["card"]) == _hyperparameters(hf_outputs["card"])
    else:  # HF's card for a multi-device run
        assert {"- num_devices: 2", "- train_batch_size: 4", "- total_train_batch_size: 8"} <= \
            set(_hyperparameters(ours["card"]))
    # main_process_first and the process facts behaved per rank
    assert proc.stdout.count("distributed: " + ("distributed" if ranks == 2 else "not_parallel")) == ranks
