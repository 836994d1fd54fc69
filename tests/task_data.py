"""Small files in the formats users bring (csv, jsonl, txt), written by the tests, whose answers a
tiny model can learn in a few dozen steps: a broken pipeline (labels misaligned, masks wrong,
targets shifted) stays at chance."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

FILLER = ("the", "a", "this", "that", "very", "really", "quite", "today", "again", "we", "they", "it", "was", "is")
SENTIMENT = {"positive": ("great", "wonderful", "superb", "lovely"), "negative": ("awful", "terrible", "dreadful",
                                                                                  "horrible"),
             "neutral": ("average", "ordinary", "typical", "standard")}
CITIES = ("paris", "london", "berlin", "madrid", "rome", "vienna")
PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank")
NUMBERS = {"one": "un", "two": "deux", "three": "trois", "four": "quatre", "five": "cinq", "six": "six",
           "seven": "sept", "eight": "huit", "nine": "neuf", "ten": "dix"}


def write_classification_csv(folder: Path, n_train: int = 240, n_eval: int = 60, seed: int = 0) -> dict[str, Path]:
    """label column of strings; the label is said by one keyword among fillers."""
    rnd = random.Random(seed)

    def rows(n):
        out = []
        for _ in range(n):
            label = rnd.choice(sorted(SENTIMENT))
            words = [rnd.choice(FILLER) for _ in range(rnd.randint(3, 7))]
            words.insert(rnd.randrange(len(words) + 1), rnd.choice(SENTIMENT[label]))
            out.append({"sentence": " ".join(words), "sentiment": label})
        return out

    paths = {}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        paths[split] = folder / f"{split}.csv"
        with open(paths[split], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["sentence", "sentiment"])
            writer.writeheader()
            writer.writerows(rows(n))
    return paths


def write_pair_csv(folder: Path, n_train: int = 320, n_eval: int = 80, seed: int = 0) -> dict[str, Path]:
    """sentence pairs (premise, hypothesis) labelled "agree" when both carry a keyword of the same polarity:
    the label depends on both columns, so a model that sees only one of them stays at chance (0.5)."""
    rnd = random.Random(seed)
    polarity = {"positive": SENTIMENT["positive"], "negative": SENTIMENT["negative"]}

    def sentence(kind):
        words = [rnd.choice(FILLER) for _ in range(rnd.randint(2, 5))]
        words.insert(rnd.randrange(len(words) + 1), rnd.choice(polarity[kind]))
        return " ".join(words)

    def rows(n):
        out = []
        for _ in range(n):
            first, second = rnd.choice(sorted(polarity)), rnd.choice(sorted(polarity))
            out.append({"premise": sentence(first), "hypothesis": sentence(second),
                        "relation": "agree" if first == second else "disagree"})
        return out

    paths = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        paths[split] = folder / f"pairs_{split}.csv"
        with open(paths[split], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["premise", "hypothesis", "relation"])
            writer.writeheader()
            writer.writerows(rows(n))
    return paths


def write_ner_jsonl(folder: Path, n_train: int = 240, n_eval: int = 60, seed: int = 0) -> dict[str, Path]:
    """words and B-PER / B-LOC / O tags; names and cities are fixed word lists."""
    rnd = random.Random(seed)

    def row():
        words, tags = [], []
        for _ in range(rnd.randint(4, 9)):
            kind = rnd.random()
            if kind < 0.2:
                words.append(rnd.choice(PEOPLE)), tags.append("B-PER")
            elif kind < 0.4:
                words.append(rnd.choice(CITIES)), tags.append("B-LOC")
            else:
                words.append(rnd.choice(FILLER)), tags.append("O")
        return {"words": words, "labels": tags}

    return _write_jsonl(folder, {"train": [row() for _ in range(n_train)],
                                 "validation": [row() for _ in range(n_eval)]})


def write_translation_jsonl(folder: Path, n_train: int = 400, n_eval: int = 40, seed: int = 0) -> dict[str, Path]:
    """English number words -> French, word by word."""
    rnd = random.Random(seed)

    def row():
        words = [rnd.choice(sorted(NUMBERS)) for _ in range(rnd.randint(2, 4))]
        return {"en": " ".join(words), "fr": " ".join(NUMBERS[w] for w in words)}

    return _write_jsonl(folder, {"train": [row() for _ in range(n_train)],
                                 "validation": [row() for _ in range(n_eval)]})


def write_chat_jsonl(folder: Path, n: int = 40, seed: int = 0) -> dict[str, Path]:
    """Two-turn conversations with a system prompt: the answer is the capital-cased city of a person."""
    rnd = random.Random(seed)

    def row():
        person, city = rnd.choice(PEOPLE), rnd.choice(CITIES)
        return {"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": f"Where does {person} live?"},
                             {"role": "assistant", "content": f"{person.title()} lives in {city.title()}."},
                             {"role": "user", "content": "And the country?"},
                             {"role": "assistant", "content": "I do not know."}]}

    return _write_jsonl(folder, {"train": [row() for _ in range(n)], "validation": [row() for _ in range(n // 4)]})


def write_counting_txt(folder: Path, lines: int = 300, seed: int = 0) -> dict[str, Path]:
    """Raw text with structure: counting runs of number words (the next word is predictable)."""
    rnd = random.Random(seed)
    words = list(NUMBERS)

    def text(n):
        out = []
        for _ in range(n):
            start = rnd.randrange(len(words) - 4)
            out.append(" ".join(words[start: start + rnd.randint(3, 5)]))
        return "\n".join(out) + "\n"

    paths = {"train": folder / "train.txt", "validation": folder / "validation.txt"}
    paths["train"].write_text(text(lines))
    paths["validation"].write_text(text(lines // 5))
    return paths


def _write_jsonl(folder: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    paths = {}
    for split, rows in splits.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
