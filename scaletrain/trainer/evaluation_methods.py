"""The Trainer's evaluation methods, as HF names them: evaluate, predict, prediction_step and
evaluation_loop (each rank evaluates its contiguous shard; results are gathered in dataset order), and
the evaluation during training that tracks the best metric."""
from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset
from transformers.trainer_pt_utils import nested_detach
from transformers.trainer_utils import EvalLoopOutput, PredictionOutput, SaveStrategy, speed_metrics

from ..modeling import default_ignore_keys
from ..optimizers import factory as optim
from ..parallel.pipeline_runtime import pipeline_of
from .evaluation import BatchMetrics, EvalResults, agreed_rounds, evaluation_metrics, is_tensor_tree
from .evaluation import join_remaining_rounds
from .step import batch_size


class EvaluationMethods:
    """Mixed into Trainer."""

    def evaluate_and_track(self, ignore_keys: Optional[list[str]], step_schedule: bool = True) -> dict[str, float]:
        """Evaluate during training: a new best metric may ask for a save (save_strategy 'best')."""
        metrics = self._evaluate(self._trial, ignore_keys, skip_scheduler=not step_schedule)
        if self.best_metric.update(self.state, metrics) and self.args.save_strategy == SaveStrategy.BEST:
            self.control.should_save = True
        if self.model_wrapped is not None:
            self.model_wrapped.train()
            optim.set_optimizer_mode(self.optimizer, training=True)
        return metrics

    def _evaluate(self, trial: Any, ignore_keys_for_eval: Optional[list[str]], skip_scheduler: bool = False
                  ) -> dict[str, float]:
        """HF's name for one evaluation during training (scripts and tests patch it): every eval set, the
        report to a hyperparameter search, and a metric schedule's step (reduce_lr_on_plateau, greedy; not
        on the eval_on_start one, as in HF)."""
        if isinstance(self.eval_dataset, dict):
            metrics: dict[str, float] = {}
            for name, dataset in self.eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys_for_eval, metric_key_prefix=f"eval_{name}"))
        else:
            metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
        self._report_to_hp_search(trial, self.state.global_step, metrics)
        if not skip_scheduler and optim.steps_on_metric(self.lr_scheduler):
            self.lr_scheduler.step(metrics[self.best_metric.key])
        return metrics

    def evaluate(self, eval_dataset: Optional[Union[Dataset, dict, str]] = None,
                 ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        self.memory_metrics.begin("eval")
        loader = self.get_eval_dataloader(eval_dataset)
        start = time.time()  # speed_metrics reads the wall clock
        loss_only = True if self.compute_metrics is None else None
        output = self.evaluation_loop(loader, "Evaluation", prediction_loss_only=loss_only, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        output.metrics.update(speed_metrics(metric_key_prefix, start, output.num_samples, len(loader)))
        self.memory_metrics.end("eval", output.metrics)
        self.log(output.metrics)
        self.callback_handler.eval_dataloader = loader
        self.fire("on_evaluate", metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset: Dataset, ignore_keys: Optional[list[str]] = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        self.memory_metrics.begin("test")
        loader = self.get_test_dataloader(test_dataset)
        start = time.time()
        output = self.evaluation_loop(loader, "Prediction", ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        output.metrics.update(speed_metrics(metric_key_prefix, start, output.num_samples, len(loader)))
        self.memory_metrics.end("test", output.metrics)
        self.fire("on_predict", metrics=output.metrics)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None):
        """(loss, logits, labels) for one batch, as the HF Trainer returns them."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            ignore_keys = default_ignore_keys(self.strategy.unwrap(self.model))
        labels = None
        if has_labels:
            labels = nested_detach(tuple(inputs[k] for k in self.label_names))
            labels = labels[0] if len(labels) == 1 else labels
        pipeline = pipeline_of(self.strategy.unwrap(model))
        if pipeline is not None:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, logits = pipeline.predict(inputs, not prediction_loss_only, self.strategy.device)
            return (loss, None, None) if prediction_loss_only else (loss, logits, labels)
        with torch.no_grad(), self.compute_loss_context_manager():
            if has_labels:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach().mean()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        if isinstance(outputs, dict):
            logits = tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"] and is_tensor_tree(v))
        else:
            logits = tuple(v for v in (outputs[1:] if has_labels else outputs) if is_tensor_tree(v))
        logits = nested_detach(logits)
        if isinstance(logits, (tuple, list)) and len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels

    def evaluation_loop(self, dataloader: DataLoader, description: str, prediction_loss_only: Optional[bool] = None,
                        ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Each rank evaluates its contiguous shard; results are gathered in
        dataset order, every sample exactly once."""
        args = self.args
        loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        model = self._evaluation_model()
        per_batch = args.batch_eval_metrics and self.compute_metrics is not None and not loss_only
        rounds = agreed_rounds(self.strategy, dataloader, always=per_batch)
        batch_metrics = BatchMetrics(self.strategy, self.compute_metrics, args.include_for_metrics, rounds) \
            if per_batch else None
        # as HF: per-batch metrics keep no predictions while evaluating, but predict() returns them
        results = EvalResults(keep=batch_metrics is None or description == "Prediction",
                              concat_batches=args.eval_do_concat_batches, include=args.include_for_metrics)
        main_input = getattr(self.strategy.unwrap(self.model), "main_input_name", "input_ids")
        for inputs in dataloader:
            items = self.loss_weighting.count_items(inputs)
            loss, logits, labels = self.prediction_step(model, inputs, loss_only, ignore_keys)
            if logits is not None and self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, labels)
            results.add(batch_size(inputs), loss, items, logits, labels, inputs.get(main_input))
            if batch_metrics is not None:
                batch_metrics.add(logits, labels, loss, inputs, batch_size(inputs))
            self.fire("on_prediction_step")
        join_remaining_rounds(self.strategy, rounds, results.batches, dataloader,
                              lambda filler: self.prediction_step(model, filler, loss_only, ignore_keys),
                              batch_metrics)
        num_samples, losses, parts = results.gather(self.strategy)
        metrics = evaluation_metrics(self.strategy, self.compute_metrics, parts, losses, metric_key_prefix,
                                     batch_metrics)
        return EvalLoopOutput(predictions=parts["preds"], label_ids=parts["labels"], metrics=metrics,
                              num_samples=num_samples)

    def _evaluation_model(self) -> torch.nn.Module:
        if self.model_wrapped is None and self.strategy.eval_needs_all_ranks:
            # evaluate/predict before (or without) train(): a sharding backend
            # must still shard the model, or every rank would need all of it
            self._setup_model()
        model = self.strategy.eval_model(self.model_wrapped if self.model_wrapped is not None else self.model)
        model.eval()
        optim.set_optimizer_mode(self.optimizer, training=False)
        full_eval = torch.float16 if self.args.fp16_full_eval else torch.bfloat16 if self.args.bf16_full_eval else None
        if full_eval is not None and not self.is_in_train:
            model.to(dtype=full_eval)  # as HF: outside training the model is cast in place, and stays cast
        return model
