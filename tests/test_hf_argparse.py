"""HF example scripts start with HfArgumentParser over (model, data, training) dataclasses and read a command
line, a JSON or a YAML file. scaletrain.TrainingArguments must parse every one of them as HF's class does."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Optional

import pytest
import transformers
import yaml
from transformers import HfArgumentParser

import scaletrain
from scaletrain import NotSupportedError


@dataclass
class ModelArguments:  # the shape of run_glue.py's, in our own words
    model_name_or_path: str = field(metadata={"help": "path of a pretrained model"})
    cache_dir: Optional[str] = None
    use_fast_tokenizer: bool = True


@dataclass
class DataTrainingArguments:
    max_seq_length: int = 128
    pad_to_max_length: bool = False
    max_train_samples: Optional[int] = None
    task_name: Optional[str] = None


# what people put on the command line of run_glue / run_clm / run_summarization, all implemented by scaletrain
ARGV = [
    "--model_name_or_path", "some/model", "--max_seq_length", "64", "--task_name", "sst2",
    "--output_dir", "OUT", "--do_train", "--do_eval",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--gradient_accumulation_steps", "2",
    "--learning_rate", "3e-5", "--weight_decay", "0.01", "--num_train_epochs", "2", "--warmup_steps", "0.1",
    "--lr_scheduler_type", "cosine", "--max_grad_norm", "0.5", "--optim", "adamw_torch",
    "--eval_strategy", "steps", "--eval_steps", "10", "--save_strategy", "steps", "--save_steps", "20",
    "--save_total_limit", "2", "--logging_steps", "5", "--logging_first_step",
    "--load_best_model_at_end", "--metric_for_best_model", "accuracy", "--greater_is_better", "true",
    "--seed", "7", "--data_seed", "11", "--report_to", "none", "--gradient_checkpointing",
    "--include_num_input_tokens_seen", "no", "--no_remove_unused_columns", "--dataloader_num_workers", "0",
    "--disable_tqdm", "true", "--use_cpu", "--bf16", "--ddp_timeout", "600", "--run_name", "glue",
]


def _comparable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _parse(classes, argv, tmp_path):
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    return HfArgumentParser(classes).parse_args_into_dataclasses(argv)


def _given_fields(argv) -> set[str]:
    names = {a[2:] for a in argv if a.startswith("--")}
    return {n.removeprefix("no_") if n.startswith("no_") else n for n in names}


def test_a_command_line_parses_as_it_does_for_the_hf_class(tmp_path):
    ours = _parse((ModelArguments, DataTrainingArguments, scaletrain.TrainingArguments), ARGV, tmp_path)
    theirs = _parse((ModelArguments, DataTrainingArguments, transformers.TrainingArguments), ARGV, tmp_path)
    assert ours[:2] == theirs[:2]
    ours_args, hf_args = ours[2], theirs[2]
    training_fields = _given_fields(ARGV) & {f for f in vars(hf_args)}
    assert len(training_fields) >= 35  # the comparison below covers the command line, not a handful of fields
    differ = {n: (getattr(ours_args, n), getattr(hf_args, n)) for n in sorted(training_fields)
              if _comparable(getattr(ours_args, n)) != _comparable(getattr(hf_args, n))}
    assert differ == {}
    assert ours_args.activation_checkpointing is True and ours_args.remove_unused_columns is False


@pytest.mark.parametrize("kind", ["json", "yaml"])
def test_a_json_or_yaml_file_parses_as_it_does_for_the_hf_class(tmp_path, kind):
    settings = {"model_name_or_path": "m", "output_dir": str(tmp_path), "do_train": True,
                "per_device_train_batch_size": 2, "gradient_checkpointing": True, "eval_strategy": "epoch",
                "save_strategy": "epoch", "load_best_model_at_end": True, "report_to": ["none"],
                "include_num_input_tokens_seen": "no", "use_cpu": True, "lr_scheduler_type": "constant"}
    path = tmp_path / f"args.{kind}"
    path.write_text(json.dumps(settings) if kind == "json" else yaml.safe_dump(settings))
    parsed = {}
    for cls in (scaletrain.TrainingArguments, transformers.TrainingArguments):
        parser = HfArgumentParser((ModelArguments, cls))
        parsed[cls] = (parser.parse_json_file if kind == "json" else parser.parse_yaml_file)(str(path))[1]
    ours, theirs = parsed[scaletrain.TrainingArguments], parsed[transformers.TrainingArguments]
    assert {n: _comparable(getattr(ours, n)) for n in settings if n != "model_name_or_path"} == \
        {n: _comparable(getattr(theirs, n)) for n in settings if n != "model_name_or_path"}


def test_seq2seq_arguments_parse_their_own_fields(tmp_path):
    argv = ["--output_dir", "OUT", "--predict_with_generate", "--generation_max_length", "32",
            "--generation_num_beams", "2", "--use_cpu"]
    ours, = _parse((scaletrain.Seq2SeqTrainingArguments,), argv, tmp_path)
    theirs, = _parse((transformers.Seq2SeqTrainingArguments,), argv, tmp_path)
    for name in ("predict_with_generate", "generation_max_length", "generation_num_beams"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.predict_with_generate is True and ours.generation_num_beams == 2


def test_a_refused_field_on_the_command_line_names_itself(tmp_path):
    with pytest.raises(NotSupportedError, match="push_to_hub=True"):
        _parse((scaletrain.TrainingArguments,), ["--output_dir", "OUT", "--push_to_hub"], tmp_path)



@pytest.mark.parametrize("rank, local_rank, log_on_each_node, expected", [
    (0, 0, True, "info"), (1, 1, True, "error"),  # the main process gets log_level, replicas log_level_replica
    (2, 0, True, "info"), (2, 0, False, "error"),  # a node's first process logs only with log_on_each_node
])
def test_process_facts_and_log_levels_follow_the_launcher(monkeypatch, rank, local_rank, log_on_each_node, expected):
    """HF's documented semantics (HF's own class would start a 4-rank process group to answer)."""
    import logging

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    ours = scaletrain.TrainingArguments(output_dir="out", use_cpu=True, log_level="info", log_level_replica="error",
                                        log_on_each_node=log_on_each_node)
    assert (ours.process_index, ours.local_process_index, ours.world_size) == (rank, local_rank, 4)
    assert ours.parallel_mode.value == "distributed" and ours.device.type == "cpu" and ours.n_gpu == 0
    assert ours.get_process_log_level() == getattr(logging, expected.upper())
    assert ours.should_log == (expected == "info")


def test_local_rank_from_an_old_launcher_is_parsed_and_the_environment_decides(monkeypatch, tmp_path):
    """torch.distributed.launch and the deepspeed launcher append --local_rank=N to a script's arguments: HF's
    parser needs the field to accept it, and HF reads the process's local rank elsewhere (local_process_index,
    from the launcher's environment). Here the field says 1 and the environment 0: the environment decides."""
    argv = ["--output_dir", "OUT", "--use_cpu", "--local_rank=1"]
    # HF's class, before the environment below (with it, HF's would start a 4-rank process group)
    theirs, = _parse((transformers.TrainingArguments,), argv, tmp_path)
    hf_default = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True).local_rank
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ours, = _parse((scaletrain.TrainingArguments,), argv, tmp_path)
    assert ours.local_rank == theirs.local_rank == 1  # kept as passed, as HF keeps it
    assert (ours.local_process_index, ours.process_index, ours.world_size) == (0, 2, 4)
    # a node's first process (local rank 0 by the environment; 1 by the field) logs with log_on_each_node,
    # and only the global rank 0 writes files
    assert ours.should_log and not ours.should_save
    default, = _parse((scaletrain.TrainingArguments,), ["--output_dir", "OUT", "--use_cpu"], tmp_path)
    assert default.local_rank == hf_default == -1  # not given: the environment alone says


def test_set_helpers_change_fields_as_hf_does_and_are_checked_again():
    ours = scaletrain.TrainingArguments(output_dir="out", use_cpu=True)
    theirs = transformers.TrainingArguments(output_dir="out", use_cpu=True)
    for args in (ours, theirs):
        args.set_training(learning_rate=1e-3, batch_size=4, gradient_accumulation_steps=2, seed=1)
        args.set_logging(strategy="steps", steps=7, report_to="none")
        args.set_save(strategy="epoch", total_limit=2)
        args.set_lr_scheduler(name="cosine", warmup_steps=0.1)
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                 "logging_steps", "save_strategy", "save_total_limit", "lr_scheduler_type", "warmup_steps"):
        assert _comparable(getattr(ours, name)) == _comparable(getattr(theirs, name)), name
    assert ours.report_to == []  # canonicalised as at construction (HF's setter leaves the string "none")
    ours.set_evaluate(strategy="steps", steps=5, accumulation_steps=2)
    assert ours.eval_accumulation_steps == 2 and ours.eval_strategy == "steps"
    with pytest.raises(NotSupportedError, match="push_to_hub=True"):
        ours.set_push_to_hub("user/model")
