from .manager import (
    COMMIT_MARKER,
    CheckpointError,
    CheckpointManager,
    committed_checkpoints,
    latest_checkpoint,
    resolve_resume_target,
)

__all__ = ["COMMIT_MARKER", "CheckpointError", "CheckpointManager", "committed_checkpoints", "latest_checkpoint",
           "resolve_resume_target"]
