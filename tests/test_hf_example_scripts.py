"""HF example-style scripts (tests/scripts/: text classification, causal LM with block_size grouping,
masked LM, NER-style token classification, seq2seq with generation) run with scaletrain after
changing their import only, in one process and on 2 ranks, and write what the HF Trainer writes."""
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
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]
# scaletrain's own addition (docs/guides/hf-differences.md): a readable copy of the arguments (metrics.jsonl
# is written only with report_to "jsonl", so an HF script's output_dir holds what HF's does)
OUR_EXTRA_FILES = {"training_args.json"}
OUR_EXTRA_METRICS = {"train_tokens_per_second", "train_tflops_per_rank", "train_peak_memory_gb"}
WORDS = [f"w{i}" for i in range(5, 40)]  # the scripts' synthetic text; ids 5..39 after 5 special tokens
TINY_BERT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                 max_position_embeddings=32)


def _tokenizer():
    """A word-level fast tokenizer ([CLS] words [SEP]), saved beside each model as a hub folder holds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]",
                                   model_input_names=["input_ids", "attention_mask"])


def _models() -> dict:
    import transformers as t

    return {
        "text_classification": lambda: t.BertForSequenceClassification(
            t.BertConfig(**TINY_BERT, num_labels=2)),
        "causal_lm": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40,
                                                            n_positions=32, bos_token_id=2, eos_token_id=3,
                                                            pad_token_id=0)),
        "masked_lm": lambda: t.BertForMaskedLM(t.BertConfig(**TINY_BERT)),
        "token_classification": lambda: t.BertForTokenClassification(t.BertConfig(**TINY_BERT, num_labels=3)),
        "seq2seq": lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=40, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=3)),
    }


# task -> (the script's own arguments, the training rows it reports)
TASKS = {
    "text_classification": (["--do_predict"], 64),
    "causal_lm": (["--block_size", "16"], 36),  # 72 sentences x 8 tokens, grouped into blocks of 16
    "masked_lm": ([], 36),
    "token_classification": ([], 72),
    "seq2seq": (["--predict_with_generate", "--generation_max_length", "12"], 72),
}


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict:
    folders = {}
    for task, build in _models().items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(task)
        build().save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        folders[task] = str(folder)
    return folders


# an HF-style ZeRO-2 config as users hand to `deepspeed script.py --deepspeed ds_config.json` ("auto" values
# filled from the TrainingArguments, as HF fills them)
DS_ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


def _launch(launcher: str, ranks: int, out: Path) -> tuple[list[str], list[str], dict]:
    """The command in front of the script, the arguments after it, and the environment, as users launch."""
    if launcher == "python":
        return [str(BIN / "python")], [], {}
    port = str(free_port())
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={port}"], [], {}
    if launcher == "accelerate":
        return ([str(BIN / "python"), "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(ranks),
                 "--main_process_port", port], [], {"ACCELERATE_USE_CPU": "1"})
    config = out.parent / f"{out.name}-ds_config.json"
    config.write_text(json.dumps(DS_ZERO2))
    # the deepspeed launcher appends --local_rank=N to the script's arguments, as it does for HF's scripts
    return ([str(BIN / "python"), "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
             port], ["--deepspeed", str(config)], {})


def _run(library: str, task: str, out: Path, model: str, ranks: int = 1, launcher: str = "",
         ) -> subprocess.CompletedProcess:
    launcher = launcher or ("python" if ranks == 1 else "torchrun")
    launch, extra, launch_env = _launch(launcher, ranks, out)
    args = ["--model_name_or_path", model, "--output_dir", str(out), "--do_train", "--do_eval",
            "--per_device_train_batch_size", str(8 // ranks), "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "2", "--report_to", "none",
            "--use_cpu", "--seed", "3", "--disable_tqdm", "true", *TASKS[task][0], *extra]
    env = {**os.environ, "TRAINER_LIBRARY": library, "OMP_NUM_THREADS": "1", **launch_env}
    script = SCRIPTS / f"hf_style_{task}.py"
    proc = subprocess.run(launch + [str(script)] + args, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _outputs(out: Path) -> dict:
    results = {p.name: json.loads(p.read_text()) for p in out.glob("*results.json")}
    return {"files": {p.name for p in out.iterdir()}, **results,
            "trainer_state.json": json.loads((out / "trainer_state.json").read_text()),
            "card": (out / "README.md").read_text()}


def _hyperparameters(card: str) -> list[str]:
    section = card.split("### Training hyperparameters", 1)[1].split("###", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) >= 6, card
    return lines


@pytest.fixture(scope="module")
def hf_outputs(tmp_path_factory, model_folders):
    """The HF Trainer's files for each task, run once per module."""
    cache = {}

    def outputs(task: str) -> dict:
        if task not in cache:
            out = tmp_path_factory.mktemp(f"hf-{task}")
            _run("transformers", task, out, model_folders[task])
            cache[task] = _outputs(out)
        return cache[task]
    return outputs


# every task in one process; on 2 ranks, classification and seq2seq (generation) in the default suite and
# the others with the slow tests (`make test-all`): each run costs ~10 s of imports on 2 cores
RUNS = [(task, 1, "python") for task in sorted(TASKS)] + [
    (task, 2, "torchrun") if task in ("text_classification", "seq2seq") else
    pytest.param(task, 2, "torchrun", marks=pytest.mark.slow) for task in sorted(TASKS)] + [
    ("text_classification", 2, "accelerate"), ("text_classification", 2, "deepspeed")]


@pytest.mark.parametrize("task, ranks, launcher", RUNS)
def test_the_script_writes_what_the_hf_trainer_writes(tmp_path, model_folders, hf_outputs, task, ranks, launcher):
    out = tmp_path / "out"
    proc = _run("scaletrain", task, out, model_folders[task], ranks, launcher)
    if launcher == "deepspeed":  # the --deepspeed config chose the strategy, as it chooses HF's backend
        assert json.loads((out / "training_args.json").read_text())["strategy"] == "zero2"
    ours, theirs = _outputs(out), hf_outputs(task)
    assert ours["files"] == theirs["files"] | OUR_EXTRA_FILES
    results = sorted(name for name in theirs["files"] if name.endswith("results.json"))
    assert {"all_results.json", "train_results.json", "eval_results.json"} <= set(results)
    for name in results:
        assert set(ours[name]) == set(theirs[name]) | (OUR_EXTRA_METRICS & set(ours[name])), name
    assert ours["all_results.json"]["train_samples"] == theirs["all_results.json"]["train_samples"] == TASKS[task][1]
    assert ours["all_results.json"]["epoch"] == theirs["all_results.json"]["epoch"] == 2.0
    assert set(ours["trainer_state.json"]) == set(theirs["trainer_state.json"])
    if "predict_results.txt" in theirs["files"]:  # do_predict: a header and a row per evaluation row
        assert len((out / "predict_results.txt").read_text().splitlines()) == 33
    # FLOPs are HF's estimate from the tokens seen (fixed-length rows): the same whatever the number of ranks
    assert ours["trainer_state.json"]["total_flos"] == theirs["trainer_state.json"]["total_flos"] > 0
    steps = -(-TASKS[task][1] // 8) * 2
    assert ours["trainer_state.json"]["global_step"] == theirs["trainer_state.json"]["global_step"] == steps
    if ranks == 1:
        assert _hyperparameters(ours["card"]) == _hyperparameters(theirs["card"])
    else:  # HF's card for a multi-device run
        assert {"- num_devices: 2", "- train_batch_size: 4", "- total_train_batch_size: 8"} <= \
            set(_hyperparameters(ours["card"]))
    # main_process_first and the process facts behaved per rank
    assert proc.stdout.count("distributed: " + ("distributed" if ranks == 2 else "not_parallel")) == ranks
