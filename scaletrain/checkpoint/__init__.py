from .manager import (
    COMMIT_MARKER,
    CheckpointError,
    CheckpointManager,
    committed_checkpoints,
    latest_checkpoint,
)

__all__ = ["COMMIT_MARKER", "CheckpointError", "CheckpointManager", "committed_checkpoints", "latest_checkpoint"]
