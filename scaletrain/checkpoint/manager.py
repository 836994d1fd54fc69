"""Checkpoint layout, atomic commit, retention and resume lookup.

Layout of `output_dir/checkpoint-<step>/`:
    state/                 model + optimizer of a sharding strategy as it writes them:
                           DCP (sharded per rank, resharded at load) or DeepSpeed's own
    model.safetensors      the weights in HF's layout (or shards + index, or a LoRA
                           adapter_model.safetensors): from_pretrained opens the folder;
                           for single and DDP runs, the model state itself
    optimizer.pt           single and DDP runs: HF's optimizer file, the whole
                           optimizer.state_dict() (transformers.Trainer resumes it too)
    scheduler.pt           LR scheduler state (plain tensors/numbers)
    trainer_state.json     HF TrainerState (log history, best metric, ...)
    progress.json          data position (epoch, samples consumed in it, a stream's
                           state_dict), batch sizes, skipped steps and middleware
                           state (fp16 loss scale)
    rng_state[_<rank>].pth python/numpy/torch RNG of each rank, in HF's layout
    training_args.bin, config.json, tokenizer files: as HF writes them
    manifest.json          strategy, world size, versions, every file's size
    COMMITTED              written last; a folder without it is never resumed

Everything is written under `checkpoint-<step>.tmp`, and the folder is renamed
only after every rank has finished, so a crash mid-save leaves the previous
checkpoint as the newest committed one. Loads use weights_only / JSON: no
pickled code runs. A checkpoint-N folder transformers.Trainer wrote (no manifest)
is read as one too: see hf_trainer_format.py.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import transformers
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from .hf_trainer_format import (HF_TRAINER_FORMAT, OPTIMIZER_FILE, hf_trainer_manifest, load_hf_model,
                                load_optimizer_file, looks_like_hf_trainer_checkpoint, weights_resharded,
                                write_optimizer_file)
from ..version import __version__
from ..rng import capture_rng_state, restore_rng_state, rng_file_name, saved_rng_state

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"
COMMIT_MARKER = "COMMITTED"
_STEP_RE = re.compile(rf"^{PREFIX}-(\d+)$")
FORMAT_VERSION = 1


def checkpoint_step(path: Path) -> Optional[int]:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


def is_committed(path: Path) -> bool:
    return (path / COMMIT_MARKER).is_file() and (path / "manifest.json").is_file()


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", COMMIT_MARKER)}


def damage(path: Path) -> Optional[str]:
    """What is wrong with a committed checkpoint's files, or None if they are all
    there with the sizes recorded at commit."""
    recorded = json.loads((path / "manifest.json").read_text()).get("files")
    if recorded is None:
        return None  # committed before sizes were recorded
    resharded = weights_resharded(path, recorded)
    for name, size in recorded.items():
        file = path / name
        if name in resharded:
            continue
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def committed_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed, intact checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is None or not child.is_dir():
            continue
        if looks_like_hf_trainer_checkpoint(child):
            found.append((step, child))  # transformers.Trainer's: it writes no commit marker
        elif is_committed(child):
            problem = damage(child)
            if problem:
                logger.warning("ignoring %s: it is damaged (%s); an earlier checkpoint will be used", child, problem)
                warnings.warn(f"checkpoint {child} is damaged ({problem}) and is skipped", RuntimeWarning, stacklevel=2)
                continue
            found.append((step, child))
        else:
            logger.warning("ignoring %s: it has no %s marker (an interrupted save)", child, COMMIT_MARKER)
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    found = committed_checkpoints(output_dir)
    return found[-1] if found else None


_LATEST = ("latest", "true")
_NO_RESUME = ("", "false", "none", "no")


def resolve_resume_target(value: Any, output_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a run resumes from: None for no resume; True, 'latest' or
    'true' for the newest committed checkpoint in output_dir (there must be one);
    'auto' for that one if there is one, else None (a fresh start); otherwise a path,
    which must hold a committed, intact checkpoint. Raises CheckpointError naming
    the value, so the CLI can refuse it before any process group starts."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _NO_RESUME):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        # restart-based launches: continue from the newest committed, intact checkpoint, if any
        return latest_checkpoint(output_dir)
    if value is True or (isinstance(value, str) and value.strip().lower() in _LATEST):
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"No valid checkpoint found in output directory ({output_dir}): resume_from_checkpoint={value!r} "
                "asks for the newest checkpoint, but it holds no committed checkpoint; drop resume_from_checkpoint "
                "to start fresh, or pass a checkpoint path"
            )
        return found
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(
            f"Can't find a valid checkpoint at {value} (resume_from_checkpoint={str(value)!r}: no such checkpoint "
            "folder); pass an output_dir/checkpoint-<step> folder, or 'latest' for the newest committed one"
        )
    CheckpointManager.read_manifest(path)  # refuses an interrupted or damaged save
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_state(path: Path, state: Any) -> None:
    if path.suffix == ".json":
        _write_json(path, state)
    else:
        torch.save(state, path)


def _write_files(folder: Path, states: dict[str, Any], write_model_files, optimizer) -> None:
    """What the main rank (each node's first, with save_on_each_node) writes alone."""
    if optimizer is not None:
        write_optimizer_file(folder, optimizer)
    for name, stateful in states.items():
        _write_state(folder / name, stateful.state_dict())
    if write_model_files is not None:
        write_model_files(folder)


def read_state(path: Path, name: str) -> Any:
    """One saved Stateful's state_dict (see CheckpointManager.save); plain data only."""
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path} has no {name}: it was not saved by this scaletrain's trainer")
    if file.suffix == ".json":
        return json.loads(file.read_text())
    return torch.load(file, weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Stateful(Protocol):
    """What the manager saves besides model and optimizer (torch.distributed.checkpoint's Stateful)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """When/where checkpoints go; the Strategy says what the state is."""

    def __init__(self, output_dir: str | os.PathLike, strategy) -> None:
        self.output_dir = Path(output_dir)
        self.strategy = strategy
        self._pending = None  # a background save waiting for its commit
        self.last_save_blocking_s = 0.0

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, states: dict[str, Stateful], manifest_extra: dict[str, Any],
             save_only_model: bool = False, write_model_files=None, asynchronous: bool = False,
             write_weights=None) -> Path:
        """Every rank calls this. `states` maps a file name to a Stateful object
        (state_dict/load_state_dict) the main rank writes beside the model and
        optimizer state: `.json` files as JSON, `.pt` files with torch.save.
        `write_model_files(folder)` runs on the main rank and adds what an
        offline export needs (model config, tokenizer). `write_weights(folder)` runs on every rank and
        writes the model in HF's layout (a sharded model is gathered one tensor at a time).

        With `asynchronous`, the (DCP) state is staged in host memory and written
        in the background; the checkpoint is committed by `finish_pending()`,
        which the next save and the end of training call. Until then the
        previous committed checkpoint stays the resume target."""
        self.finish_pending()
        strategy = self.strategy
        final = self.output_dir / f"{PREFIX}-{step}"
        tmp = self.output_dir / f"{PREFIX}-{step}.tmp"
        started = time.perf_counter()
        if strategy.writes_files:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash; never a committed checkpoint
            tmp.mkdir(parents=True)
        strategy.barrier()

        saved_optimizer = None if save_only_model else optimizer
        # where every rank holds the whole state, HF's files are the state: model.safetensors and optimizer.pt
        # (a background save stages a DCP copy in host memory instead)
        hf_files = strategy.replicates_optimizer and write_weights is not None and not asynchronous
        try:
            if asynchronous:
                future = strategy.save_state_async(tmp / "state", model, saved_optimizer)
            elif not hf_files:
                strategy.save_state(tmp / "state", model, saved_optimizer)
            if write_weights is not None:
                write_weights(tmp)
            torch.save(capture_rng_state(), tmp / rng_file_name(strategy.rank, strategy.world_size))
            if strategy.writes_files:
                _write_files(tmp, states, write_model_files, saved_optimizer if hf_files else None)
            error = None
        except (OSError, CheckpointException) as exc:  # a full disk, a quota, a lost mount
            error = exc
        self._agree_written(error, tmp, final)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "strategy": strategy.name,
            "state_format": HF_TRAINER_FORMAT if hf_files else strategy.state_format,
            "world_size": strategy.world_size,
            "layout": strategy.layout.as_dict(),  # DCP reshards to any other one at load
            "includes_optimizer": not save_only_model,
            "optimizer_file": OPTIMIZER_FILE if hf_files and saved_optimizer is not None else None,
            "versions": _library_versions(),
            "created_unix": time.time(),
            **manifest_extra,
        }
        if asynchronous:
            self._pending = (future, tmp, final, manifest, started)
            self.last_save_blocking_s = time.perf_counter() - started  # how long training waited
            return final
        self._commit(tmp, final, manifest)
        self.last_save_blocking_s = time.perf_counter() - started
        logger.debug("saved %s in %.2fs", final, time.perf_counter() - started)
        return final

    def _agree_written(self, error: Optional[BaseException], tmp: Path, final: Path) -> None:
        """Every rank learns whether any rank failed to write its part (one reduction per save); then the
        half-written folder is removed and every rank raises, naming the checkpoint that stays."""
        strategy = self.strategy
        failed = torch.tensor([float(error is not None)], device=strategy.device)
        if not strategy.all_reduce_max(failed).item():
            return
        if strategy.writes_files:
            shutil.rmtree(tmp, ignore_errors=True)
        strategy.barrier()
        previous = latest_checkpoint(self.output_dir)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        cause = f"the disk under {self.output_dir} is full ({error})" if full else \
            (f"{type(error).__name__}: {error}" if error is not None else "another rank could not write its part")
        raise CheckpointError(
            f"saving {final.name} failed: {cause}. Nothing of it was kept; "
            f"{previous.name if previous else 'no earlier checkpoint'} stays the newest committed one "
            f"(resume_from_checkpoint=auto continues from it). "
            + ("Free space there or lower save_total_limit." if full else ""))

    def finish_pending(self) -> Optional[Path]:
        """Wait for a background save on every rank, then commit it."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        future, tmp, final, manifest, started = pending
        future.result()  # raises if this rank's write failed: then nothing is committed
        self._commit(tmp, final, manifest)
        logger.debug("saved %s in the background (%.2fs after the save began)", final, time.perf_counter() - started)
        return final

    def _commit(self, tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
        strategy = self.strategy
        strategy.barrier()  # every rank's shard and RNG file is on disk
        if strategy.writes_files:
            # sizes of every file, so a later truncation or loss is detected
            _write_json(tmp / "manifest.json", {**manifest, "files": _file_sizes(tmp)})
            _write_json(tmp / COMMIT_MARKER, {"step": manifest["step"]})
            _fsync_dir(tmp)
            if final.exists():  # same step saved again (e.g. end of training after a resume)
                stale = final.with_name(final.name + ".old")
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.output_dir)
        strategy.barrier()

    # ------------------------------------------------------------------ load
    def load(self, path: str | os.PathLike, model, optimizer, states: dict[str, Stateful],
             manifest: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Restore model, optimizer, each of `states` and this rank's RNG in place;
        returns the manifest (pass the one already read to skip reading it again)."""
        path = Path(path)
        manifest = manifest if manifest is not None else self.read_manifest(path)
        with_optimizer = optimizer is not None and manifest.get("includes_optimizer", True)
        if optimizer is not None and not with_optimizer:
            raise CheckpointError(
                f"{path} was saved with save_only_model=True and holds no optimizer state, so training cannot "
                "resume from it; start a new run from its weights instead (scaletrain export, then from_pretrained)"
            )
        self._load_state(path, model, optimizer if with_optimizer else None, manifest)
        for name, stateful in states.items():
            stateful.load_state_dict(read_state(path, name))
        rng = saved_rng_state(path, self.strategy.rank, manifest["world_size"])
        if manifest["world_size"] == self.strategy.world_size and rng is not None:
            restore_rng_state(rng)
        else:
            logger.warning("world size changed (%s -> %s): RNG streams are not restored",
                           manifest["world_size"], self.strategy.world_size)
        return manifest

    def load_model(self, path: str | os.PathLike, model) -> None:
        path = Path(path)
        self._load_state(path, model, None, self.read_manifest(path))

    def _load_state(self, path: Path, model, optimizer, manifest: dict[str, Any]) -> None:
        optimizer_file = manifest.get("optimizer_file")
        if manifest["state_format"] == HF_TRAINER_FORMAT:
            load_hf_model(path, self.strategy.unwrap(model))
        else:
            self.strategy.load_state(path / "state", model, None if optimizer_file else optimizer)
        if optimizer is not None and optimizer_file:
            load_optimizer_file(path / optimizer_file, self.strategy.unwrap(model), optimizer)

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if looks_like_hf_trainer_checkpoint(path):
            return hf_trainer_manifest(path, FORMAT_VERSION)
        if not is_committed(path):
            raise CheckpointError(
                f"checkpoint {path} has no {COMMIT_MARKER} marker: its save was interrupted. "
                f"Resume from an earlier one (resume_from_checkpoint=True picks the newest committed)"
            )
        problem = damage(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}. Resume from an earlier one "
                                  "(resume_from_checkpoint=True picks the newest intact one)")
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has checkpoint format {manifest.get('format_version')}, "
                                  f"this scaletrain reads {FORMAT_VERSION}")
        return manifest

    # ------------------------------------------------------------- retention
    def rotate(self, limit: Optional[int], keep: set[Path]) -> list[Path]:
        """Delete the oldest committed checkpoints beyond `limit`, never one in `keep`
        (the best) nor the newest (the resume target). On the processes that write files."""
        if not limit or not self.strategy.writes_files:
            return []
        found = committed_checkpoints(self.output_dir)
        protected = {p.resolve() for p in keep if p is not None} | ({found[-1].resolve()} if found else set())
        budget = max(limit, len(protected))
        removable = [p for p in found if p.resolve() not in protected]
        excess = len(found) - budget
        deleted = []
        for path in removable[: max(0, excess)]:
            logger.debug("deleting %s (save_total_limit=%s)", path, limit)
            shutil.rmtree(path)
            deleted.append(path)
        return deleted


def _library_versions() -> dict[str, str]:
    return {"scaletrain": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
