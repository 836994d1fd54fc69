"""DataLoaders for train/eval under any world size, with HF column handling."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .samplers import ContiguousShardSampler, ResumableShardedSampler, ShardedIterable

logger = logging.getLogger(__name__)
_ALWAYS_KEPT = ("label", "label_ids")


def signature_columns(model: torch.nn.Module, label_names: list[str]) -> list[str]:
    """Names the model's forward takes, plus label columns (collators rename `label`)."""
    params = inspect.signature(model.forward).parameters
    return list(params) + [c for c in (*_ALWAYS_KEPT, *label_names) if c not in params]


def _is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.Dataset)


class ColumnFilterCollator:
    """Drops keys the model's forward does not take before collating (for
    torch Datasets that yield dicts; HF datasets get their columns removed)."""

    def __init__(self, collator: Callable, columns: list[str]) -> None:
        self.collator = collator
        self.columns = set(columns)
        self._warned = False

    def __call__(self, features: list[Any]):
        if features and isinstance(features[0], dict):
            dropped = set(features[0]) - self.columns
            if dropped and not self._warned:
                logger.info("dropping columns the model does not take: %s", sorted(dropped))
                self._warned = True
            features = [{k: v for k, v in f.items() if k in self.columns} for f in features]
        return self.collator(features)


def prepare_dataset(dataset, collator: Callable, columns: Optional[list[str]], description: str):
    """Apply `remove_unused_columns`: returns (dataset, collator)."""
    if columns is None:
        return dataset, collator
    if _is_hf_dataset(dataset):
        unused = [c for c in dataset.column_names if c not in columns]
        if unused and len(unused) == len(dataset.column_names):
            raise ValueError(
                f"no column of the {description} dataset ({dataset.column_names}) is taken by the model's "
                f"forward ({columns}); tokenize it first or set remove_unused_columns=False"
            )
        if unused:
            logger.info("%s dataset: dropping columns the model does not take: %s", description, unused)
            dataset = dataset.remove_columns(unused)
        return dataset, collator
    return dataset, ColumnFilterCollator(collator, columns)


def _loader_kwargs(args, device: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_workers": args.dataloader_num_workers,
        # pinning only helps host->GPU copies, and fails without an accelerator
        "pin_memory": bool(args.dataloader_pin_memory and device.type == "cuda"),
    }
    if args.dataloader_num_workers > 0:
        kwargs["persistent_workers"] = args.dataloader_persistent_workers
        if args.dataloader_prefetch_factor is not None:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
    return kwargs


def training_lengths(original: Dataset, prepared: Dataset, args, model_input_name: Optional[str]) -> list[int]:
    """Row lengths for group_by_length, as HF finds them: the `length_column_name` column of an HF
    dataset (read before unused columns are dropped), else the length of each row's main input."""
    if _is_hf_dataset(original) and args.length_column_name in original.column_names:
        return [int(n) for n in original[args.length_column_name]]
    from transformers.trainer_pt_utils import LengthGroupedSampler

    # HF's own inference, and its error for rows that are not dicts holding the main input
    return LengthGroupedSampler(1, dataset=prepared, model_input_name=model_input_name).lengths


def build_train_dataloader(dataset: Dataset, collator: Callable, args, rank: int, world_size: int,
                           device: torch.device, batch_size: Optional[int] = None,
                           lengths: Optional[list[int]] = None) -> DataLoader:
    """`batch_size`: the run plan's micro-batch (default: per_device_train_batch_size); `lengths`:
    the rows' lengths, for train_sampling_strategy='group_by_length'."""
    batch_size = batch_size if batch_size is not None else args.per_device_train_batch_size
    if isinstance(dataset, IterableDataset):
        if args.train_sampling_strategy != "random":
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} needs a map-style dataset (with a "
                "length); an IterableDataset is read in its own order: use 'random' (the default)")
        if world_size > 1:
            dataset = ShardedIterable(dataset, rank, world_size, batch_size)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collator,
                          drop_last=args.dataloader_drop_last, **_loader_kwargs(args, device))
    seed = args.data_seed if args.data_seed is not None else args.seed
    # grouped by the global batch, which the batch finder keeps: the same order on any world size
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    sampler = ResumableShardedSampler(len(dataset), rank, world_size, seed=seed, order=args.train_sampling_strategy,
                                      lengths=lengths, group_size=group, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      collate_fn=collator, drop_last=args.dataloader_drop_last, **_loader_kwargs(args, device))


def training_stream(loader: DataLoader) -> Optional[IterableDataset]:
    """The iterable dataset a training loader reads (beneath the per-rank
    sharding, so the same stream and position on every rank), or None for
    map-style data, which seeks through its sampler instead."""
    dataset = loader.dataset
    if isinstance(dataset, ShardedIterable):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, IterableDataset) else None


def _has_shuffle_buffer(stream: Any) -> bool:
    # HF streams leave the shuffle buffer's contents out of state_dict() (see
    # datasets.IterableDataset.load_state_dict): a resume from that state skips
    # what the buffer held. The buffer lives in the private example-iterable
    # chain; a layout this walk does not know reads as "no buffer".
    pending = [getattr(stream, "_ex_iterable", None)]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return True
        pending.append(getattr(node, "ex_iterable", None))
        pending.extend(getattr(node, "ex_iterables", None) or [])
    return False


def stream_replay_reason(loader: DataLoader) -> Optional[str]:
    """Why a resume into the middle of this loader's stream has to replay the
    consumed batches instead of restoring the stream's saved position (the
    state_dict()/load_state_dict() protocol of HF and torchdata streams);
    None when the saved position can be restored exactly."""
    stream = training_stream(loader)
    if stream is None:
        return None
    if not (callable(getattr(stream, "state_dict", None)) and callable(getattr(stream, "load_state_dict", None))):
        return f"{type(stream).__name__} has no state_dict()/load_state_dict()"
    if loader.num_workers > 0:
        return "dataloader_num_workers > 0 (each worker iterates its own copy of the stream)"
    if _has_shuffle_buffer(stream):
        return "the stream has a shuffle buffer, whose contents its state_dict() leaves out"
    return None


def build_eval_dataloader(dataset: Dataset, collator: Callable, args, rank: int, world_size: int,
                          device: torch.device) -> DataLoader:
    if isinstance(dataset, IterableDataset):
        if world_size > 1:
            raise ValueError(
                "distributed evaluation of an IterableDataset cannot guarantee each sample is seen once; "
                "pass a map-style (sized) eval dataset"
            )
        sampler = None
    else:
        sampler = ContiguousShardSampler(len(dataset), rank, world_size)
    # never drop eval samples: metrics must see every one
    return DataLoader(dataset, batch_size=args.per_device_eval_batch_size, sampler=sampler,
                      collate_fn=collator, drop_last=False, **_loader_kwargs(args, device))
