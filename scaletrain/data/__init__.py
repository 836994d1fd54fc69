from .loaders import build_eval_dataloader, build_train_dataloader, ColumnFilterCollator, signature_columns
from .samplers import ContiguousShardSampler, ResumableShardedSampler, ShardedIterable

__all__ = [
    "build_eval_dataloader", "build_train_dataloader", "ColumnFilterCollator", "signature_columns",
    "ContiguousShardSampler", "ResumableShardedSampler", "ShardedIterable",
]
