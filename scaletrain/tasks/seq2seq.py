"""seq2seq: source -> target text (translation, summarization) with run_translation's preprocessing,
trained by Seq2SeqTrainer; with training.predict_with_generate the evaluation decodes generate()'s
output and scores it with sacrebleu (BLEU, chrF) and rouge-score (ROUGE-1/2/L), offline.

The built-in dataset gettext-fr reads English -> French message pairs from the gettext catalogues
under /usr/share/locale/fr (each package's own translations, under that package's licence)."""
from __future__ import annotations

import gettext
import logging
import random
from pathlib import Path

import numpy as np

from ..args.run_config import ConfigError
from .base import Task, resolve_model_path
from .causal_lm import IGNORE_INDEX
from .models import model_builders
from .user_data import OVERLENGTH, first_present, map_rows, report_truncated, require_columns

logger = logging.getLogger(__name__)
LOCALE_DIR = Path("/usr/share/locale/fr/LC_MESSAGES")
METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "gen_len")


def load_gettext_pairs(max_chars: int = 80) -> list[tuple[str, str]]:
    """One-line English -> French message pairs from every French catalogue on this machine: no
    plural forms, no contexts, no format directives (%s, {0}) or markup, unique sources."""
    if not LOCALE_DIR.is_dir():
        raise FileNotFoundError(f"{LOCALE_DIR} does not exist: the gettext-fr dataset reads the French message "
                                "catalogues of this machine's packages; use data.train_file on this machine")
    pairs: dict[str, str] = {}
    for path in sorted(LOCALE_DIR.glob("*.mo")):
        try:
            with open(path, "rb") as fh:
                catalogue = gettext.GNUTranslations(fh)._catalog
        except (OSError, UnicodeDecodeError, ValueError):  # a damaged catalogue is skipped, not fatal
            continue
        for source, target in catalogue.items():
            if isinstance(source, str) and _usable(source, max_chars) and _usable(target, max_chars):
                pairs.setdefault(source.strip(), target.strip())
    return sorted(pairs.items())


def _usable(text: object, max_chars: int) -> bool:
    return (isinstance(text, str) and 3 <= len(text.strip()) <= max_chars and "\n" not in text.strip()
            and "%" not in text and "{" not in text and "<" not in text and "\x04" not in text)


def gettext_splits(data) -> dict:
    from datasets import Dataset

    pairs = load_gettext_pairs()
    random.Random(data.split_seed).shuffle(pairs)
    eval_size = data.eval_size or 1000
    if not 0 < eval_size < len(pairs):
        raise ValueError(f"data.eval_size={eval_size} must be between 1 and {len(pairs) - 1}")
    train = pairs[eval_size:][: data.train_size] if data.train_size else pairs[eval_size:]

    def to_dataset(rows):
        return Dataset.from_dict({"source": [s for s, _ in rows], "target": [t for _, t in rows]})

    return {"train": to_dataset(train), "validation": to_dataset(pairs[:eval_size])}


def generation_metrics(tokenizer):
    """BLEU and chrF (sacrebleu) and ROUGE (rouge-score) of decoded generations against decoded labels,
    as run_translation / run_summarization compute them."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise ModuleNotFoundError("task seq2seq with predict_with_generate scores BLEU/chrF/ROUGE with sacrebleu and "
                                  "rouge-score: pip install 'scaletrain[tasks]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)

    def compute(eval_pred) -> dict[str, float]:
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predicted, references = decode_pairs(tokenizer, preds, eval_pred.label_ids)
        rouge = [scorer.score(r, p) for p, r in zip(predicted, references, strict=True)]
        out = {"bleu": sacrebleu.corpus_bleu(predicted, [references]).score,
               "chrf": sacrebleu.corpus_chrf(predicted, [references]).score}
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = 100.0 * float(np.mean([r[key].fmeasure for r in rouge]))
        pad = tokenizer.pad_token_id
        out["gen_len"] = float(np.mean([np.count_nonzero((row != pad) & (row != IGNORE_INDEX)) for row in preds]))
        return out

    return compute


def decode_texts(tokenizer, ids) -> list[str]:
    """Token ids padded with -100 (across batches) or the pad token -> stripped strings."""
    ids = np.where(np.asarray(ids) != IGNORE_INDEX, np.asarray(ids), tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def decode_pairs(tokenizer, preds, labels) -> tuple[list[str], list[str]]:
    return decode_texts(tokenizer, preds), decode_texts(tokenizer, labels)


def build_seq2seq_task(cfg, splits) -> Task:
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    data = cfg.data
    source = data.source_column or first_present(splits, ("source", "text", "document", "input")) or "source"
    target = data.target_column or first_present(splits, ("target", "summary", "output")) or "target"
    require_columns(splits, data, {"source_column": source})
    require_columns({k: v for k, v in splits.items() if k != "test"}, data, {"target_column": target})
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model.name_or_path!r} has no pad token; seq2seq batches pad "
                          "sources and targets")
    load, from_config = model_builders(cfg, path, tokenizer)
    target_length = data.max_target_length or data.max_length
    prefix = data.source_prefix or ""

    def encode(batch):
        sources = [prefix + (s or "") for s in batch[source]]
        out = tokenizer(sources, truncation=True, max_length=data.max_length)
        over = [len(ids) > data.max_length for ids in tokenizer(sources)["input_ids"]]
        if target in batch:
            targets = [t or "" for t in batch[target]]
            out["labels"] = tokenizer(text_target=targets, truncation=True, max_length=target_length)["input_ids"]
            long_targets = tokenizer(text_target=targets)["input_ids"]
            over = [o or len(ids) > target_length for o, ids in zip(over, long_targets, strict=True)]
        out[OVERLENGTH] = over
        return out

    encoded = {split: report_truncated(map_rows(ds, encode, data, ds.column_names, f"tokenizing {split}"), split,
                                       data.max_length, "max_length (sources) / max_target_length")
               for split, ds in splits.items()}
    generate = bool(getattr(cfg.training, "predict_with_generate", False))
    if not generate and "test" in splits:
        raise ConfigError("data.test_file is predicted by generation: set training.predict_with_generate: true")
    if not generate:
        logger.info("training.predict_with_generate is off: evaluation reports the loss only (no BLEU/ROUGE)")

    def decode(predictions, split: str = "test") -> list[dict]:
        ids = predictions[0] if isinstance(predictions, tuple) else predictions
        if not generate:
            raise ConfigError("seq2seq predictions are generated text: set training.predict_with_generate: true")
        return [{"text": t} for t in decode_texts(tokenizer, ids)]

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return Task(load, from_config, tokenizer, encoded["train"], encoded.get("validation"),
                generation_metrics(tokenizer) if generate else None, [], data_collator=collator,
                metric_names=METRICS if generate else (), test_dataset=encoded.get("test"),
                decode_predictions=decode, seq2seq=True)
