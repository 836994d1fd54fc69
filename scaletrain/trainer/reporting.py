"""The HF Trainer's reporting and introspection methods that example scripts call around train():
log_metrics / save_metrics / save_state (HF's own functions), the model card, FLOPs, sizes."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers.utils import logging as hf_logging

from .flops import attention_flops
from ..parallel.pipeline_runtime import pipeline_of
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader
from transformers import modelcard
from transformers.trainer_pt_utils import log_metrics, metrics_format, save_metrics, save_state

from ..errors import NotSupportedError
from ..optimizers import factory as optim

StrList = Optional[Union[str, list[str]]]


class ReportingMethods:
    """Mixed into Trainer; needs its args, state, strategy, model, optimizer and plan."""

    log_metrics = log_metrics
    metrics_format = metrics_format
    save_metrics = save_metrics
    save_state = save_state

    def create_model_card(self, language: Optional[str] = None, license: Optional[str] = None, tags: StrList = None,
                          model_name: Optional[str] = None, finetuned_from: Optional[str] = None,
                          tasks: StrList = None, dataset_tags: StrList = None, dataset: StrList = None,
                          dataset_args: StrList = None) -> None:
        """README.md in output_dir, as the HF Trainer drafts it (transformers' TrainingSummary)."""
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "README.md"
        if path.exists() and tags is not None:  # keep the tags an earlier card (e.g. peft's) has
            tags = [tags] if isinstance(tags, str) else list(tags)
            tags += [t for t in (ModelCard.load(path).data.tags or []) if t not in tags]
        summary = modelcard.TrainingSummary.from_trainer(
            self, language=language, license=license, tags=tags, model_name=model_name,
            finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
            dataset_args=dataset_args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(summary.to_model_card(), encoding="utf-8")
        adapter_card = getattr(self.strategy.unwrap(self.model), "create_or_update_model_card", None)
        if callable(adapter_card):
            adapter_card(self.args.output_dir)

    def push_to_hub(self, *args, **kwargs):
        raise NotSupportedError("Trainer.push_to_hub is not supported by scaletrain: it never talks to a model hub. "
                                "save_model() writes a plain HF folder; upload it with `hf upload <repo> <folder>`")

    def get_num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.strategy.unwrap(self.model).parameters() if p.requires_grad)

    def get_learning_rates(self) -> list[float]:
        if self.optimizer is None:
            raise ValueError("the optimizer is not set up yet: call after train() starts, or create_optimizer()")
        return [group["lr"] for group in self.optimizer.param_groups]

    def _log_hf_run_start(self, plan) -> None:
        """HF's "Running training" block, on HF's trainer logger at info level (scripts and tooling written
        for HF read it there; transformers' default verbosity keeps it out of the console)."""
        hf_logger = hf_logging.get_logger("transformers.trainer")
        if not hf_logger.isEnabledFor(logging.INFO):
            return  # nobody reads it: no parameter count, no dataset length
        try:
            examples = self.num_examples(self.train_loader)
        except TypeError:  # a stream: HF counts the samples the run will read
            examples = plan.geometry.global_batch * plan.max_steps
        lines = ["***** Running training *****",
                 f"  Num examples = {examples:,}",
                 f"  Num Epochs = {plan.num_epochs:,}",
                 f"  Num update steps per epoch = {plan.updates_per_epoch or '?'}",
                 f"  Instantaneous batch size per device = {plan.per_device:,}",
                 f"  Total train batch size (w. parallel, distributed & accumulation) = {plan.geometry.global_batch:,}",
                 f"  Gradient Accumulation steps = {plan.accumulation}",
                 f"  Total optimization steps = {plan.max_steps:,}",
                 f"  Number of trainable parameters = {self.get_num_trainable_parameters():,}"]
        for line in lines:
            hf_logger.info(line)

    def get_optimizer_group(self, param: Union[str, torch.nn.Parameter, None] = None):
        """HF's helper: the optimizer group holding `param`, else every group's parameter list."""
        if self.optimizer is None:
            raise ValueError("the optimizer is not set up yet: call after train() starts, or create_optimizer()")
        if param is not None:
            for group in self.optimizer.param_groups:
                if any(param is p for p in group["params"]):
                    return group
        return [group["params"] for group in self.optimizer.param_groups]

    def num_examples(self, dataloader: DataLoader) -> int:
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):  # an iterable dataset: estimated from the batches
            return len(dataloader) * (dataloader.batch_size or 1)

    def get_total_train_batch_size(self, args=None) -> int:
        """Samples per optimizer step over all ranks (the run plan's, once train() has made it)."""
        if self.plan is not None:
            return self.plan.geometry.global_batch
        args = args if args is not None else self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.strategy.layout.dp_size

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model: Optional[torch.nn.Module] = None) -> tuple[type, dict[str, Any]]:
        return optim.optimizer_cls_and_kwargs_for(args, model)

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True
                                       ) -> contextlib.AbstractContextManager:
        """The precision context of forwards (autocast where the strategy does not cast itself)."""
        return self.strategy.forward_context()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """HF's estimate: 6 x tokens x non-embedding parameters, for models that can count them."""
        model = self.strategy.unwrap(self.model)
        main_input = getattr(model, "main_input_name", "input_ids")
        pipeline = pipeline_of(model)  # a pipeline rank holds some stages: the whole model's count
        count = pipeline.non_embedding_parameters if pipeline is not None else \
            model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else None
        return 6 * inputs[main_input].numel() * count if main_input in inputs and count is not None else 0

    def attention_flops(self, inputs: dict[str, Any]) -> float:
        """The attention FLOPs HF's estimate leaves out (flops.py): model FLOPs = floating_point_ops + this."""
        model = self.strategy.unwrap(self.model)
        return attention_flops(model, inputs, getattr(model, "main_input_name", "input_ids"))

    def store_flos(self) -> None:
        """Adds every rank's FLOPs since the last call to state.total_flos (a collective)."""
        flos = torch.tensor([float(self.current_flos)], dtype=torch.float64, device=self.strategy.device)
        self.state.total_flos += float(self.strategy.batch_all_reduce_sum(flos).item())
        self.current_flos = 0.0
