"""The user's own files for every task, through the CLI: a YAML written by the test, trained for real on
2 ranks under a sharded strategy, with a quality bar a broken pipeline would not reach and predictions
read back in the user's terms; bad data refused before any process group with exit code 2."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import task_data
from helpers import free_port

BIN = Path(sys.executable).parent
TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
TINY_LLAMA = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 32}
TRAINING = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 3.0e-3,
            "logging_steps": 10, "eval_strategy": "epoch", "eval_on_start": True, "save_strategy": "no",
            "disable_tqdm": True, "report_to": "none", "seed": 0}


def write_config(folder: Path, task: str, model: dict, data: dict, **training) -> Path:
    config = {"task": task, "model": {"dropout": 0.0, **model}, "data": data,
              "training": {**TRAINING, "output_dir": str(folder / "out"), **training}}
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scaletrain(args: list[str], cwd: Path, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launch = [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}"] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(launch + [str(BIN / "scaletrain"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=400, stdin=subprocess.DEVNULL, check=False)
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def summary(folder: Path) -> dict:
    return json.loads((folder / "out" / "summary.json").read_text())


def evaluations(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def test_text_classification_from_csv_on_2_ranks_fsdp(tmp_path):
    paths = task_data.write_classification_csv(tmp_path)
    config = write_config(tmp_path, "text-classification",
                          {"name_or_path": "minilm", "config_overrides": TINY_BERT},
                          {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
                           "test_file": str(paths["test"]), "text_column": "sentence", "label_column": "sentiment",
                           "max_length": 16}, num_train_epochs=4, strategy="fsdp")
    scaletrain(["train", str(config)], tmp_path, ranks=2)
    result = summary(tmp_path)
    assert result["strategy"].startswith("fsdp (world size 2")
    # 3 balanced classes: chance is ~0.33
    assert result["eval_accuracy"] >= 0.9, result["eval_metrics"]
    exported = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert exported["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}  # string labels, sorted
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    predicted = [json.loads(line)["label"] for line in lines]
    with open(paths["test"]) as fh:
        truth = [row["sentiment"] for row in csv.DictReader(fh)]
    assert len(predicted) == len(truth)
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth) >= 0.9

    # the checkpoint-free path: the exported folder evaluated and predicted again, in one process
    proc = scaletrain(["eval", str(config), "--checkpoint", str(tmp_path / "out" / "final"),
                       "--strategy", "single"], tmp_path)
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert metrics["eval_accuracy"] == pytest.approx(result["eval_accuracy"])


def test_sentence_pairs_from_yaml_train_on_both_columns_and_a_misspelled_column_is_refused(tmp_path, capsys):
    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    paths = task_data.write_pair_csv(tmp_path)
    data = {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
            "text_column": ["premise", "hypothesis"], "label_column": "relation", "max_length": 24}
    model = {"name_or_path": "minilm"}  # pretrained: agreement of two sentences is beyond a tiny model in seconds
    config = write_config(tmp_path, "text-classification", model, data, num_train_epochs=3, learning_rate=1e-4,
                          per_device_train_batch_size=8, logging_steps=20)
    task = build_task(load_config(config))
    first = task.train_dataset[0]
    # BERT's pair encoding: [CLS] premise [SEP] hypothesis [SEP], the second segment typed 1
    assert first["input_ids"].count(task.tokenizer.sep_token_id) == 2 and 1 in first["token_type_ids"]
    scaletrain(["train", str(config)], tmp_path)
    before, after = evaluations(tmp_path)[0], evaluations(tmp_path)[-1]
    # the label is agreement between the two sentences: one column alone cannot beat chance (0.5)
    assert before["eval_accuracy"] < 0.7 and after["eval_accuracy"] >= 0.9, (before, after)

    misspelled = ((["premis", "hypothesis"], "text_column[0]", "premise"),
                  (["premise", "hypotesis"], "text_column[1]", "hypothesis"))
    for columns, field, meant in misspelled:
        bad = write_config(tmp_path, "text-classification", model, {**data, "text_column": columns})
        code, err = _cli(["train", str(bad)], capsys)
        assert code == 2 and f"(data.{field}) is not in the train split" in err, err
        assert f"did you mean {meant!r}?" in err, err
    assert not torch.distributed.is_initialized()


def test_string_labels_under_the_default_label_column_become_ids(tmp_path):
    """A column named `label` (data.label_column's default) with string labels: the ids are integers."""
    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    (tmp_path / "train.csv").write_text("text,label\ngreat film,positive\nawful film,negative\nlovely day,positive\n")
    config = write_config(tmp_path, "text-classification", {"name_or_path": "minilm", "config_overrides": TINY_BERT},
                          {"train_file": str(tmp_path / "train.csv"), "max_length": 16})
    task = build_task(load_config(config))
    assert list(task.train_dataset["labels"]) == [1, 0, 1] and task.labels == ["negative", "positive"]


def test_token_classification_from_jsonl_on_2_ranks_zero2(tmp_path):
    paths = task_data.write_ner_jsonl(tmp_path)
    config = write_config(tmp_path, "token-classification",
                          {"name_or_path": "minilm", "config_overrides": TINY_BERT},
                          {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
                           "max_length": 24}, num_train_epochs=4, strategy="zero2", save_strategy="epoch")
    scaletrain(["train", str(config)], tmp_path, ranks=2)
    result = summary(tmp_path)
    before, after = evaluations(tmp_path)[0], evaluations(tmp_path)[-1]
    assert before["step"] == 0 and before["eval_f1"] < 0.5
    assert after["eval_f1"] >= 0.9 and after["eval_precision"] >= 0.9 and after["eval_recall"] >= 0.9, after
    assert result["eval_metrics"]["eval_f1"] == after["eval_f1"]
    # a ZeRO-2 checkpoint evaluated in one process: its weights read whole, the step's evaluation again
    first = evaluations(tmp_path)[1]
    proc = scaletrain(["eval", str(config), "--checkpoint", str(tmp_path / "out" / f"checkpoint-{first['step']}"),
                       "--strategy", "single"], tmp_path)
    again = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert again["eval_f1"] == pytest.approx(first["eval_f1"]) and again["eval_loss"] == pytest.approx(
        first["eval_loss"], rel=1e-5)
    # words -> tags through the exported folder: one tag per word, in the user's tag names
    proc = scaletrain(["predict", str(config), "--checkpoint", str(tmp_path / "out" / "final"), "--split",
                       "validation", "--output", str(tmp_path / "tags.jsonl")], tmp_path)
    assert "predictions in" in proc.stdout
    rows = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
    predicted = [json.loads(line)["tags"] for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert [len(p) for p in predicted] == [len(r["words"]) for r in rows]
    tags = [t for p in predicted for t in p]
    truth = [t for r in rows for t in r["labels"]]
    assert sum(a == b for a, b in zip(tags, truth, strict=True)) / len(truth) >= 0.95


def _unigram_entropy(tokenizer, train: str, validation: str) -> float:
    """Cross-entropy of the validation tokens under the training tokens' unigram frequencies (add-one):
    what a model that ignores context can reach."""
    end = [tokenizer.eos_token_id]
    train_ids = [t for line in train.splitlines() for t in tokenizer(line, add_special_tokens=False)["input_ids"] + end]
    counts, total, vocab = Counter(train_ids), len(train_ids), len(tokenizer)
    ids = [t for line in validation.splitlines() for t in tokenizer(line, add_special_tokens=False)["input_ids"] + end]
    return -sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids) / len(ids)


def test_causal_lm_raw_text_packed_into_blocks_on_2_ranks_fsdp(tmp_path):
    from transformers import AutoTokenizer

    from scaletrain.tasks import resolve_model_path

    paths = task_data.write_counting_txt(tmp_path, lines=1200)
    config = write_config(tmp_path, "causal-lm", {"name_or_path": "smollm2", "config_overrides": TINY_LLAMA},
                          {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
                           "block_size": 32}, num_train_epochs=3, learning_rate=1.0e-2, strategy="fsdp")
    scaletrain(["train", str(config)], tmp_path, ranks=2)
    result = summary(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    baseline = _unigram_entropy(tokenizer, paths["train"].read_text(), paths["validation"].read_text())
    # counting runs make most next words predictable from the previous one: well below the unigram bound
    assert result["eval_loss"] < 0.5 * baseline, (result["eval_loss"], baseline)
    assert result["eval_metrics"]["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    n_tokens = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1
                   for line in paths["train"].read_text().splitlines())
    assert result["train_samples"] == n_tokens // 32  # run_clm's grouping: whole blocks, the remainder dropped


def _spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token  # a target is the token itself (the model shifts)
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.fixture(scope="module")
def chat_task(tmp_path_factory):
    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    folder = tmp_path_factory.mktemp("chat")
    paths = task_data.write_chat_jsonl(folder, n=12)
    config = write_config(folder, "causal-lm", {"name_or_path": "smollm2", "config_overrides": TINY_LLAMA},
                          {"train_file": str(paths["train"]), "max_length": 128})
    return build_task(load_config(config)), paths


def test_chat_loss_mask_covers_exactly_the_assistant_turns(chat_task):
    task, paths = chat_task
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(task.train_dataset) == len(rows)
    for example, row in zip(task.train_dataset, rows, strict=True):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # SmolLM2's template closes a turn with <|im_end|> and a newline: targets, so the model learns to stop
        assert _spans(example["input_ids"], example["labels"], task.tokenizer) == [a + "<|im_end|>\n" for a in answers]
        context = task.tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"], strict=True)
                                         if lab == -100])
        assert "Answer briefly." in context and "Where does" in context and "And the country?" in context
        assert not any(a in context for a in answers)


def test_packed_chat_batches_give_the_padded_batches_loss(chat_task):
    """data.pack: one row per micro-batch with position ids restarting per conversation; the loss equals
    the padded batch's, and without the restarting positions (conversations attending to each other) it
    does not, so the comparison can fail."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from scaletrain.modeling import apply_use_cache

    task, _ = chat_task
    torch.manual_seed(0)
    model = task.build_model_from_config().eval()
    apply_use_cache(model, False)  # as the Trainer does: transformers builds packed-sequence masks only without a cache
    rows = [task.train_dataset[i] for i in range(4)]
    padded = DataCollatorForSeq2Seq(task.tokenizer, label_pad_token_id=-100, padding=True)(rows)
    packed = DataCollatorWithFlattening(return_position_ids=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        padded_loss = model(**padded).loss
        packed_loss = model(**packed).loss
        crossing = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert abs(crossing.item() - padded_loss.item()) > 1e-3


def test_every_file_format_gives_the_same_rows(tmp_path):
    """csv, jsonl, parquet and a save_to_disk folder are the same data; max_train_samples and
    validation_split_percentage cut it as the HF scripts do."""
    import datasets

    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    paths = task_data.write_classification_csv(tmp_path, n_train=40, n_eval=10)
    rows = datasets.load_dataset("csv", data_files=str(paths["train"]), split="train")
    rows.to_json(tmp_path / "train.jsonl")
    rows.to_parquet(tmp_path / "train.parquet")
    rows.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": rows, "validation": rows.select(range(10))}).save_to_disk(str(tmp_path / "dict"))
    common = {"text_column": "sentence", "label_column": "sentiment", "max_length": 16}
    built = {}
    sources = {"csv": {"train_file": str(paths["train"])}, "jsonl": {"train_file": str(tmp_path / "train.jsonl")},
               "parquet": {"train_file": str(tmp_path / "train.parquet")},
               "save_to_disk": {"train_file": str(tmp_path / "saved")},
               "dataset_name": {"dataset_name": str(tmp_path / "dict")}}
    for name, source in sources.items():
        config = write_config(tmp_path, "text-classification", {"name_or_path": "minilm",
                                                                "config_overrides": TINY_BERT},
                              {**source, **common, "max_train_samples": 30})
        task = build_task(load_config(config))
        built[name] = (list(task.train_dataset["input_ids"]), list(task.train_dataset["labels"]), task.labels)
    assert len(built["csv"][0]) == 30
    assert all(value == built["csv"] for value in built.values())

    def split(**data):
        config = write_config(tmp_path, "text-classification", {"name_or_path": "minilm",
                                                                "config_overrides": TINY_BERT},
                              {"train_file": str(paths["train"]), **common, **data})
        return build_task(load_config(config))

    every_row = sorted(map(tuple, split().train_dataset["input_ids"]))
    task = split(validation_split_percentage=25)
    assert (len(task.train_dataset), len(task.eval_dataset)) == (30, 10)
    # a partition of the training file: every row in exactly one of the two splits
    assert sorted(map(tuple, list(task.train_dataset["input_ids"]) + list(task.eval_dataset["input_ids"]))) == every_row


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from scaletrain.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def _bad_data_config(tmp_path: Path, **data) -> str:
    paths = task_data.write_classification_csv(tmp_path, n_train=20, n_eval=6)
    return str(write_config(tmp_path, "text-classification", {"name_or_path": "minilm", "config_overrides": TINY_BERT},
                            {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
                             "text_column": "sentence", "label_column": "sentiment", **data}))


BAD_DATA = {
    "missing file": ({"train_file": "nowhere/train.csv"}, "data.train_file='nowhere/train.csv' does not exist"),
    "missing column": ({"label_column": "sentimnt"}, "column 'sentimnt' (data.label_column) is not in the train "
                                                     "split"),
    "did you mean": ({"text_column": "sentense"}, "did you mean 'sentence'?"),
    "unknown file type": ({"train_file": "train.xlsx"}, "unknown file type '.xlsx'"),
    "field of another task": ({"block_size": 128}, "data.block_size does not apply to task text-classification"),
    "built-in and own data": ({"dataset": "trec"}, "data.dataset='trec' is a built-in dataset"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_before_any_process_group(tmp_path, capsys, case):
    data, message = BAD_DATA[case]
    if case == "unknown file type":
        (tmp_path / "train.xlsx").write_text("x")
        data = {"train_file": str(tmp_path / "train.xlsx")}
    code, err = _cli(["train", _bad_data_config(tmp_path, **data)], capsys)
    assert code == 2 and message in err, err
    assert not torch.distributed.is_initialized()


def test_empty_split_mixed_labels_and_missing_labels_name_the_file_and_row(tmp_path, capsys):
    config = _bad_data_config(tmp_path)
    (tmp_path / "validation.csv").write_text("sentence,sentiment\n")
    code, err = _cli(["train", config], capsys)
    assert code == 2 and "validation.csv" in err and ("has no rows" in err or "could not be read" in err), err

    rows = [{"sentence": "fine", "sentiment": "positive"}, {"sentence": "bad", "sentiment": 3}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _cli(["train", config, "--train_file", str(tmp_path / "mixed.jsonl"), "--validation_file",
                      str(tmp_path / "mixed.jsonl")], capsys)
    assert code == 2 and "mixed.jsonl" in err, err

    (tmp_path / "gap.csv").write_text("sentence,sentiment\nfine,positive\nbad,\n")
    code, err = _cli(["train", config, "--train_file", str(tmp_path / "gap.csv"), "--validation_file",
                      str(tmp_path / "gap.csv")], capsys)
    assert code == 2 and "row 1 of the train split" in err and "has no 'sentiment'" in err, err


def test_unseen_validation_label_is_added_with_a_warning_and_long_rows_are_counted(tmp_path, caplog):
    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    config = _bad_data_config(tmp_path, max_length=6)
    with open(tmp_path / "validation.csv", "a") as fh:
        fh.write("a brand new kind of sentence,surprised\n")
    with caplog.at_level("WARNING"):
        task = build_task(load_config(config))
    assert task.labels == ["negative", "neutral", "positive", "surprised"]
    assert "labels ['surprised'] appear in the validation split but not in training" in caplog.text
    assert "rows are longer than data.max_length=6 tokens and were truncated" in caplog.text
    assert max(len(ids) for ids in task.train_dataset["input_ids"]) == 6


def test_exit_code_2_from_the_command_line(tmp_path):
    config = _bad_data_config(tmp_path, train_file="missing.csv")
    proc = scaletrain(["train", config], tmp_path, check=False)
    assert proc.returncode == 2 and "data.train_file='missing.csv' does not exist" in proc.stderr


def test_float_labels_are_a_regression_target_as_in_run_glue(tmp_path):
    from scaletrain.args.run_config import load_config
    from scaletrain.tasks import build_task

    (tmp_path / "scores.csv").write_text("sentence,score\ngreat film,4.5\nawful film,1.0\nfine film,3.0\n")
    config = write_config(tmp_path, "text-classification", {"name_or_path": "minilm", "config_overrides": TINY_BERT},
                          {"train_file": str(tmp_path / "scores.csv"), "text_column": "sentence",
                           "label_column": "score"})
    task = build_task(load_config(config))
    model = task.build_model_from_config()
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert list(task.train_dataset["labels"]) == [4.5, 1.0, 3.0]
    assert task.metric_names == ("mse", "num_samples")
