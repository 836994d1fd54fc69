"""Every check of a checkpoint against the run about to resume from it, on one read of its files.

Two phases, as the run needs them: the batch geometry before the model is set up
(the strategy may need the accumulation at setup), the model after it (its
fingerprint is taken from the set-up model, adapters included).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint import CheckpointError
from ..checkpoint.compatibility import check_same_model
from ..checkpoint.hf_trainer_format import HF_TRAINER_FORMAT, hf_trainer_progress, position_from_global_step
from ..checkpoint.manager import read_state
from .plan import BatchGeometry

logger = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    manifest: dict[str, Any]
    progress: dict[str, Any]  # progress.json as saved, plus the saving world size
    geometry: BatchGeometry  # this run's batch geometry, which keeps the checkpoint's global batch

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        if "model_fingerprint" in self.manifest:  # transformers.Trainer's folders have none: the load checks names
            check_same_model(self.path, self.manifest, fingerprint)

    def saved_progress(self, updates_per_epoch: Optional[int]) -> dict[str, Any]:
        """progress.json as saved; for a transformers.Trainer checkpoint, its global step placed in the epoch
        as HF places it (it records no position of its own)."""
        if "epoch" in self.progress:
            return self.progress
        return {**self.progress, **position_from_global_step(self.progress["global_step"], updates_per_epoch,
                                                             self.geometry.accumulation)}


def read_resume_point(path: Path, checkpoints, strategy, configured: BatchGeometry, auto_find_batch_size: bool
                      ) -> ResumePoint:
    """Raises CheckpointError for any incompatibility, before any state is loaded."""
    manifest = checkpoints.read_manifest(path)
    saved_format = manifest.get("state_format", "dcp")
    if saved_format not in strategy.resume_formats:
        raise CheckpointError(
            f"{path} holds {saved_format!r} state (saved by strategy {manifest['strategy']}); strategy "
            f"{strategy.name} reads {' or '.join(map(repr, strategy.resume_formats))}. Resume with a strategy "
            "of the same family, or export it (scaletrain export) and start from the weights"
        )
    if saved_format == HF_TRAINER_FORMAT and strategy.layout.pp > 1:
        raise CheckpointError(
            f"{path} holds whole-model HF files (saved by strategy {manifest.get('strategy', 'transformers')}), "
            f"whose optimizer state is numbered in the whole model's order; pipeline stages (parallelism_config "
            f"pp_size={strategy.layout.pp}) resume from DCP state keyed by name: resume it once with strategy fsdp "
            "without pp_size (its checkpoints are DCP), then with pp_size"
        )
    # transformers.Trainer writes no progress.json: its position is its global step
    saved_position = read_state(path, PROGRESS_FILE) if (path / PROGRESS_FILE).is_file() else \
        hf_trainer_progress(path)
    saved_dp = _saved_dp_size(manifest)
    progress = {"world_size": saved_dp, **saved_position}  # the data-parallel ranks that read the data
    saved = BatchGeometry(progress.get("per_device_train_batch_size"),
                          progress.get("gradient_accumulation_steps", configured.accumulation),
                          saved_dp)
    if auto_find_batch_size:
        configured = _found_batch_size(path, saved, configured)
    geometry = _geometry_for(path, saved, configured, "samples_in_epoch" in progress)
    strategy.prepare_resume(saved.dp_size, geometry.accumulation)
    return ResumePoint(path, manifest, progress, geometry)


def _saved_dp_size(manifest: dict[str, Any]) -> int:
    """The checkpoint's data-parallel degree: its world size over its tensor- and sequence-parallel ranks."""
    layout = manifest.get("layout")
    if not layout:  # written before layouts were recorded, or by transformers.Trainer: data parallel only
        return manifest["world_size"]
    return layout["dp_replicate"] * layout["dp_shard"]


def _found_batch_size(path: Path, saved: BatchGeometry, configured: BatchGeometry) -> BatchGeometry:
    """With auto_find_batch_size, a resume continues with the micro-batch the
    finder chose for the checkpointed run (no new search), if its global
    batch is the configured one."""
    if saved.per_device is None or saved.per_device == configured.per_device:
        return configured
    if saved.global_batch != configured.global_batch:
        raise CheckpointError(f"{path} has a global batch of {saved.global_batch}; this run "
                              f"is configured for {configured.global_batch}. Keep the batch settings to resume")
    if saved.dp_size != configured.dp_size:
        return configured
    logger.info("resuming with the batch finder's earlier choice: micro-batch %d x %d accumulation",
                saved.per_device, saved.accumulation)
    return configured.with_micro_batch(saved.per_device, saved.accumulation)


def _geometry_for(path: Path, saved: BatchGeometry, run: BatchGeometry, has_sample_position: bool
                  ) -> BatchGeometry:
    """The geometry a resume continues with. Another world size with the same micro-batch keeps the saved
    global batch (the accumulation adapts); a batch setting the user changed is followed, as HF's Trainer
    follows it, with a warning when the global batch changes (the data position is kept in samples)."""
    if saved.per_device == run.per_device and saved.dp_size != run.dp_size:
        return _same_global_batch(path, saved, run, has_sample_position)
    if saved.per_device != run.per_device and not has_sample_position:
        raise CheckpointError(f"{path} does not record its data position in samples; it resumes with "
                              f"per_device_train_batch_size={saved.per_device} only")
    if saved.global_batch != run.global_batch:
        logger.warning("resuming %s with another batch: %d data-parallel ranks x %d per device x %d accumulation = "
                       "%d per step (the checkpoint was trained with %d); the schedule continues by steps and the "
                       "data by samples", path, run.dp_size, run.per_device, run.accumulation, run.global_batch,
                       saved.global_batch)
    return run


def _same_global_batch(path: Path, saved: BatchGeometry, run: BatchGeometry, has_sample_position: bool
                       ) -> BatchGeometry:
    """Another world size, the same micro-batch: the accumulation that keeps the saved global batch."""
    if saved.global_batch % (run.per_device * run.dp_size):
        raise CheckpointError(
            f"{path} has a global batch of {saved.global_batch} ({saved.dp_size} ranks x {saved.per_device} x "
            f"{saved.accumulation} accumulation); {run.dp_size} ranks x {run.per_device} cannot make it up. "
            "Use a world size that divides it, or per_device_train_batch_size that does"
        )
    if not has_sample_position:
        raise CheckpointError(f"{path} does not record its data position in samples; it resumes on "
                              f"{saved.dp_size} ranks only")
    accumulation = saved.global_batch // (run.per_device * run.dp_size)
    logger.warning("resuming a checkpoint of %d data-parallel ranks on %d: gradient_accumulation_steps %d -> %d "
                   "keeps the global batch at %d; RNG streams start fresh", saved.dp_size, run.dp_size,
                   saved.accumulation, accumulation, saved.global_batch)
    return run.with_micro_batch(run.per_device, accumulation)
