"""`scaletrain train CONFIG [--field value ...]`, `scaletrain hpo CONFIG [--field value ...]`,
`scaletrain eval CONFIG --checkpoint PATH`, `scaletrain predict CONFIG --checkpoint PATH [--output F]`,
`scaletrain export CHECKPOINT OUT_DIR`, `scaletrain estimate CONFIG [--world-size N]`,
`scaletrain plan CONFIG --gpus N [...]` and `scaletrain bench CONFIG [--strategies ...] [--micro-batch ...]`.

The same command runs alone or under torchrun / accelerate launch / SLURM: the
launcher's environment decides the world size, the config decides the rest.
The config is fully validated before any process group starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from .args.run_config import ConfigError, ModelConfig, load_config, resolve_config_path
from .trainer.preemption import PREEMPTED_EXIT_CODE, Preempted


def _prepare(config_name: str, overrides: list[str], command: str = "train", checkpoint: str | None = None):
    """Everything that can be wrong with the input, checked before any process group."""
    from .parallel.console import configure_console
    from .parallel.environment import read_env
    from .strategies import build_strategy

    from .checkpoint import resolve_resume_target

    cfg = load_config(resolve_config_path(config_name), overrides)
    env = read_env()
    strategy = build_strategy(cfg.training, env)  # validates; starts no process group
    configure_console(env, cfg.training)  # before data preparation: its progress shows once
    # 'latest'/'true' is pinned to one folder here, so every rank resumes the same checkpoint
    target = resolve_resume_target(cfg.training.resume_from_checkpoint, cfg.training.output_dir)
    cfg.training.resume_from_checkpoint = str(target) if target is not None else None

    if command == "hpo":
        if cfg.search is None:
            raise ConfigError(f"{config_name} has no search section; add search: with parameters, n_trials, metric "
                              "and direction (see docs/guides/search.md)")
        if cfg.training.resume_from_checkpoint is not None:
            raise ConfigError("resume_from_checkpoint does not apply to a search; give search.storage (e.g. "
                              "sqlite:///OUT/study.db) and run the same command again to continue it")
        cfg.search.check(cfg.training, [f.name for f in dataclasses.fields(ModelConfig)])
    elif cfg.search is not None:
        logging.getLogger(__name__).info("the search section is for `scaletrain hpo`; train runs the base config")
    if command in ("eval", "predict"):
        _point_model_at(cfg, checkpoint)

    from .tasks import build_task

    task = build_task(cfg)
    if command == "hpo":
        cfg.search.check_metrics(list(task.metric_names))
    if strategy.layout.tp > 1:
        from .parallel.tensor_parallel import check_model_splits

        check_model_splits(task.build_model_from_config, strategy.layout.tp)
    if strategy.layout.sp > 1:
        from .parallel.sequence_parallel import check_sequence_split

        check_sequence_split(task.build_model_from_config, strategy.layout.sp, strategy.layout.tp,
                             cfg.data.block_size if cfg.task == "causal-lm" and not cfg.data.pack else None)
    if strategy.layout.pp > 1:
        from .parallel.pipeline import check_model_splits_into_stages

        check_model_splits_into_stages(task.build_model_from_config, strategy.args.parallelism_config)
    return cfg, env, strategy, task


def _train(cfg, env, strategy, task) -> int:
    from transformers.trainer_utils import set_seed

    from .checkpoint import CheckpointError

    wall_start = time.perf_counter()
    strategy.setup_environment()
    set_seed(cfg.training.seed)  # the model's random init (if any) is part of the run
    model = strategy.build_model(task.load_model, task.build_model_from_config)
    trainer = _trainer_for(task, cfg, strategy, model)
    try:
        try:
            train_out = _preemptible(lambda: trainer.train(resume_from_checkpoint=cfg.training.resume_from_checkpoint),
                                     "resume_from_checkpoint=auto continues")
        except CheckpointError as exc:  # a save that could not be written; the earlier checkpoints stand
            print(f"scaletrain: checkpoint error: {exc}", file=sys.stderr, flush=True)
            return 1
        if train_out is None:
            return PREEMPTED_EXIT_CODE
        eval_metrics = trainer.evaluate() if task.eval_dataset is not None else {}
        final_dir = trainer.save_model(str(Path(cfg.training.output_dir) / "final"))
        if task.test_dataset is not None:  # as the HF scripts' do_predict: the test file's predictions
            _test_split(trainer, task, Path(cfg.training.output_dir))
        wall = time.perf_counter() - wall_start
        if trainer.is_world_process_zero():
            summary = {
                "strategy": trainer.strategy.describe(),
                "train_samples": len(task.train_dataset),
                "task": cfg.task,
                "eval_samples": len(task.eval_dataset) if task.eval_dataset is not None else 0,
                "eval_accuracy": eval_metrics.get("eval_accuracy"),
                "eval_macro_f1": eval_metrics.get("eval_macro_f1"),
                "eval_loss": eval_metrics.get("eval_loss"),
                "eval_metrics": _with_perplexity(eval_metrics, cfg.task),
                # with eval_on_start: the held-out loss before any training step
                "eval_loss_before": next((e["eval_loss"] for e in trainer.state.log_history
                                          if "eval_loss" in e and e.get("step") == 0), None),
                "train_tokens_per_second": train_out.metrics.get("train_tokens_per_second"),
                "model": trainer.middleware.describe(),
                "train_loss": train_out.training_loss,
                "train_samples_per_second": train_out.metrics["train_samples_per_second"],
                "train_runtime_s": train_out.metrics["train_runtime"],
                "wall_time_s": round(wall, 2),
                "final_model": str(final_dir),
                "best_checkpoint": trainer.state.best_model_checkpoint,
                "best_metric": [cfg.training.metric_for_best_model, trainer.state.best_metric],
                "best_loaded_at_end": bool(cfg.training.load_best_model_at_end),
                "metrics_file": str(Path(cfg.training.output_dir) / "metrics.jsonl"),
                "config": cfg.to_dict(),
            }
            Path(cfg.training.output_dir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            _print_summary(summary)
    finally:
        trainer.strategy.teardown()
        _KEEP_UNTIL_EXIT.append(trainer)
    return 0


def _with_perplexity(metrics: dict, task: str, prefix: str = "eval") -> dict:
    """run_clm reports exp(<prefix>_loss) as perplexity for language models."""
    import math

    if task == "causal-lm" and metrics.get(f"{prefix}_loss") is not None:
        metrics = {**metrics, f"{prefix}_perplexity": math.exp(min(metrics[f"{prefix}_loss"], 50.0))}
    return metrics


def _trainer_for(task, cfg, strategy, model):
    from .trainer.seq2seq_trainer import Seq2SeqTrainer
    from .trainer import Trainer

    return _cli_voice((Seq2SeqTrainer if task.seq2seq else Trainer)(
        model=model, args=cfg.training, train_dataset=task.train_dataset, eval_dataset=task.eval_dataset,
        processing_class=task.tokenizer, compute_metrics=task.compute_metrics, strategy=strategy,
        data_collator=task.data_collator, callbacks=_metrics_file(cfg.training),
    ))


def _metrics_file(args) -> list:
    """The CLI always writes output_dir/metrics.jsonl (its summary points there), whatever report_to says."""
    from .callbacks import JsonlMetricsCallback

    return [] if "jsonl" in args.report_to else [JsonlMetricsCallback()]


def _cli_voice(trainer):
    """Without a progress bar (disable_tqdm) HF's PrinterCallback prints every log dict to stdout; the CLI
    speaks through its own lines and summary (and eval/predict print JSON there), so it drops it."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# The trainer (with DDP's reducer, which holds the gloo process group) stays
# alive until entrypoint() leaves through os._exit. Freeing it destroys the
# process group, whose destructor joins gloo's worker threads while holding the
# GIL; a worker still freeing a finished collective's tensors needs the GIL,
# and the rank deadlocks after its work is done (seen in CI: a ddp rank of
# `accelerate launch` hung after the summary; gdb showed exactly this). The
# pause in Strategy.teardown covers library use; this removes the destructor.
_KEEP_UNTIL_EXIT: list = []


def _hpo(cfg, env, strategy, task) -> int:
    """The config's search: trials of the training section with the search section's values."""
    from .search.search_section import model_values
    from .tasks import build_task
    from .trainer import Trainer

    strategy.setup_environment()
    search = cfg.search
    built: dict = {}

    def model_init(trial=None):
        values = model_values(search, trial)
        source = build_task(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **values))) \
            if values else task
        trainer_strategy = built["trainer"].strategy if "trainer" in built else strategy
        return trainer_strategy.build_model(source.load_model, source.build_model_from_config)

    built["trainer"] = trainer = _cli_voice(Trainer(
        model_init=model_init, args=cfg.training, train_dataset=task.train_dataset, eval_dataset=task.eval_dataset,
        processing_class=task.tokenizer, compute_metrics=task.compute_metrics, strategy=strategy,
        data_collator=task.data_collator, callbacks=_metrics_file(cfg.training)))
    metrics = search.metrics
    try:
        best = _preemptible(lambda: trainer.hyperparameter_search(
            hp_space=search.hp_space(trainer.args), n_trials=search.n_trials,
            compute_objective=lambda m: m[metrics[0]] if len(metrics) == 1 else [m[k] for k in metrics],
            direction=search.direction, **search.optuna_kwargs()), "the same command continues the search")
        if best is None:
            return PREEMPTED_EXIT_CODE
        if trainer.is_world_process_zero():
            _print_search_summary(trainer, best, metrics)
    finally:
        trainer.strategy.teardown()
        _KEEP_UNTIL_EXIT.append(trainer)
    return 0


EVAL_OPTIONS = {"--checkpoint": "checkpoint", "--output": "output", "--split": "split"}


def _pop_eval_options(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """--checkpoint / --output / --split of `scaletrain eval|predict`; the rest are config overrides."""
    rest, options = _pop_flags(overrides, EVAL_OPTIONS)
    if not options.get("checkpoint"):
        raise ConfigError("--checkpoint PATH is required: an output_dir/checkpoint-<step> folder or an exported HF "
                          "folder (e.g. output_dir/final)")
    if options.get("split", "test") not in ("test", "validation"):
        raise ConfigError(f"--split={options['split']!r} must be test or validation")
    return rest, options


def _point_model_at(cfg, checkpoint: str) -> None:
    """An HF folder (config.json) is the model itself; a scaletrain checkpoint is loaded into the
    configured model once the strategy has set it up."""
    from .checkpoint.manager import is_committed

    path = Path(checkpoint)
    if _is_hf_folder(path):
        cfg.model = dataclasses.replace(cfg.model, name_or_path=str(path), config_overrides=None, encoder_decoder=False)
    elif not is_committed(path):
        raise ConfigError(f"--checkpoint {checkpoint} is neither an HF folder (config.json) nor a committed "
                          "scaletrain checkpoint (output_dir/checkpoint-<step> with COMMITTED)")


def _is_hf_folder(path: Path) -> bool:
    """An exported model (checkpoint folders carry a config.json too, beside their sharded state)."""
    from .checkpoint.manager import is_committed

    return (path / "config.json").is_file() and not is_committed(path)


def _evaluate_checkpoint(cfg, env, strategy, task, options: dict[str, str], command: str) -> int:
    """`scaletrain eval|predict`: the checkpoint's model on the config's validation (eval) or test
    (predict; validation when there is no test file) data, under the launcher and strategy given."""
    from .checkpoint.export import load_checkpoint_model
    from .checkpoint.manager import CheckpointManager

    strategy.setup_environment()
    path = Path(options["checkpoint"])
    # a checkpoint of any strategy is read whole (as export reads it) and handed to this run's strategy
    load = task.load_model if _is_hf_folder(path) else lambda: load_checkpoint_model(
        path, CheckpointManager.read_manifest(path))
    trainer = _trainer_for(task, cfg, strategy, strategy.build_model(load, task.build_model_from_config))
    try:
        if command == "eval":
            if task.eval_dataset is None:
                raise ConfigError("scaletrain eval needs validation data: data.validation_file (or "
                                  "validation_split_percentage)")
            metrics = _with_perplexity(trainer.evaluate(), cfg.task)
            if trainer.is_world_process_zero():
                print(json.dumps(metrics, indent=2, default=str), flush=True)
            return 0
        split = options.get("split") or ("test" if task.test_dataset is not None else "validation")
        output = Path(options.get("output") or Path(cfg.training.output_dir) / f"predictions-{split}.jsonl")
        _write_predictions(trainer, task, split, output)
        return 0
    finally:
        trainer.strategy.teardown()
        _KEEP_UNTIL_EXIT.append(trainer)


def _test_split(trainer, task, out: Path) -> None:
    """Predictions of the test file, or for language models (no decoded prediction) its loss and perplexity."""
    if task.decode_predictions is not None:
        return _write_predictions(trainer, task, "test", out / "predictions.jsonl")
    metrics = _with_perplexity(trainer.evaluate(task.test_dataset, metric_key_prefix="test"), "causal-lm", "test")
    if trainer.is_world_process_zero():
        (out / "test_results.json").write_text(json.dumps(metrics, indent=2))


def _write_predictions(trainer, task, split: str, output: Path) -> None:
    """One JSON line per example of the split, in the user's terms (label names, tags, text); the
    split's metrics (when it has labels) go to OUTPUT's .metrics.json."""
    dataset = task.test_dataset if split == "test" else task.eval_dataset
    if dataset is None:
        raise ConfigError(f"no {split} data to predict: give data.{split if split == 'test' else 'validation'}_file")
    if task.decode_predictions is None:
        raise ConfigError("predictions are written for text-classification, token-classification and seq2seq; "
                          "for causal-lm run scaletrain eval (loss and perplexity)")
    result = trainer.predict(dataset, metric_key_prefix=split)
    if trainer.is_world_process_zero():
        output.parent.mkdir(parents=True, exist_ok=True)
        rows = task.decode_predictions(result.predictions, split)
        output.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        output.with_suffix(".metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str))
        print(f"scaletrain: {len(rows)} {split} predictions in {output}", flush=True)


def _preemptible(run, how_to_continue: str):
    """run()'s result, or None after a preemption (its checkpoint committed; for a search, the trial
    queued again)."""
    try:
        return run()
    except Preempted as exc:
        print(f"scaletrain: {exc}; exit code {PREEMPTED_EXIT_CODE} ({how_to_continue})", file=sys.stderr, flush=True)
        return None


def _print_search_summary(trainer, best, metrics: list[str]) -> None:
    from .search.report import format_table
    from .search.runner import checkpoint_to_export

    runs = best if isinstance(best, list) else [best]
    out = trainer.args.output_dir
    print("\n=== scaletrain search summary ===", flush=True)
    print(format_table(trainer.search_study, int(runs[0].run_id)))
    for run in runs:
        objective = run.objective if isinstance(run.objective, list) else [run.objective]
        shown = ", ".join(f"{m}={v:.5g}" for m, v in zip(metrics, objective, strict=True))
        print(f"best trial {run.run_id}: {shown} with {run.hyperparameters}")
        checkpoint = checkpoint_to_export(run)
        if checkpoint is not None:
            print(f"  its model: scaletrain export {checkpoint} {out}/best-model")
    print(f"trials: {out}/trials.csv, {out}/trials.json; plots: {out}/*.png", flush=True)


_TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss", "epoch")


def _print_summary(s: dict) -> None:
    quality = {k: v for k, v in s["eval_metrics"].items() if k not in _TIMING and isinstance(v, (int, float))}
    loss = s["eval_loss"]
    lines = [
        "",
        "=== scaletrain run summary ===",
        f"task / strategy   {s['task']} / {s['strategy']}",
        f"data              {s['train_samples']} train / {s['eval_samples']} held-out samples",
        "eval              " + (", ".join(f"{k[5:]} {v:.4g}" for k, v in quality.items()) or "n/a"),
        (f"eval loss         {s['eval_loss_before']:.4f} before -> {loss:.4f} after training"
         if s.get("eval_loss_before") is not None else f"eval loss         {loss:.4f}" if loss is not None
         else "eval loss         n/a (no validation data)"),
        f"train throughput  {s['train_samples_per_second']:.1f} samples/s, "
        f"{s['train_tokens_per_second'] or 0:.0f} tokens/s (non-padding input tokens)",
        f"middleware        {s['model']}",
        f"train time        {s['train_runtime_s']:.1f} s (wall {s['wall_time_s']:.1f} s incl. eval and save)",
        f"final model       {s['final_model']}  (HF folder, safetensors)",
        *_best_checkpoint_line(s),
        f"metrics           {s['metrics_file']}",
    ]
    print("\n".join(lines), flush=True)


def _best_checkpoint_line(s: dict) -> list[str]:
    if not s.get("best_checkpoint"):
        return []
    metric, value = s["best_metric"]
    score = f"{metric} {value:.4g}" if value is not None else metric
    loaded = ", its weights are the final model's" if s["best_loaded_at_end"] else ""
    return [f"best checkpoint   {s['best_checkpoint']} ({score}{loaded})"]


def _export(checkpoint: str, out_dir: str, merge: bool = False, base: str | None = None) -> int:
    from .checkpoint import CheckpointError
    from .checkpoint.export import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_checkpoint(checkpoint, out_dir, merge=merge, base=base)
    except CheckpointError as exc:
        print(f"scaletrain: export error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {out}")
    return 0


def _estimate(config_name: str, world_size: int | None, overrides: list[str]) -> int:
    from .middleware.chunked_loss import planned_loss_chunk
    from .middleware.activation_ckpt import every_and_selective
    from .performance.estimate import estimate_table, precision_of, world_sizes_for
    from .tasks import model_shape_from_config

    try:
        cfg = load_config(resolve_config_path(config_name), overrides)
        shape, model_name = model_shape_from_config(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"scaletrain: error: {exc}", file=sys.stderr)
        return 2
    args = cfg.training
    precision = precision_of(args)
    every, selective = every_and_selective(args)
    chunk = planned_loss_chunk(args.chunked_loss, args.chunked_loss_tokens, shape, bool(args.activation_checkpointing),
                               precision)
    print(f"{model_name}: {shape.parameters:,} trainable parameters, micro-batch {args.per_device_train_batch_size} x "
          f"{cfg.data.max_length} tokens, {precision}, activation checkpointing "
          f"{('selective' if selective else 'on') if args.activation_checkpointing else 'off'}, "
          f"{f'chunked loss ({chunk} tokens per chunk)' if chunk else 'whole logits'} (Adam(W); per rank)\n")
    print(estimate_table(shape, world_sizes_for(world_size), precision, args.per_device_train_batch_size,
                         cfg.data.max_length, every if args.activation_checkpointing else 0, args.offload_optimizer,
                         args.offload_params, args.gradient_accumulation_steps, args.ddp_gradient_as_bucket_view,
                         loss_chunk=chunk, selective=selective))
    from .performance.plan_command import configured_layout_lines

    print("\n".join(["", *configured_layout_lines(cfg, world_sizes_for(world_size))]).rstrip())
    return 0


_BENCH_OPTIONS = {"--strategies": "strategies", "--micro-batch": "micro_batch", "--steps": "steps",
                  "--warmup": "warmup", "--checkpointing": "checkpointing", "--compile": "compile"}
_VARIANTS = {"off": [False], "on": [True], "both": [False, True]}


def _pop_flags(overrides: list[str], flags: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A command's own flags ({flag: option name}), wherever they sit among the --field value overrides."""
    rest, options = [], {}
    items = iter(overrides)
    for item in items:
        name, _, value = item.partition("=")
        if name in flags:
            options[flags[name]] = value or next(items, "")
        else:
            rest.append(item)
    return rest, options


def _pop_bench_options(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    return _pop_flags(overrides, _BENCH_OPTIONS)


def _bench_points(options: dict[str, str], cfg):
    from .performance.bench import bench_points

    try:
        strategies = [s for s in options.get("strategies", cfg.training.strategy).split(",") if s]
        micro = [int(m) for m in options.get("micro_batch", str(cfg.training.per_device_train_batch_size)).split(",")]
        variants = [_VARIANTS[options.get(key, "off")] for key in ("checkpointing", "compile")]
        steps, warmup = int(options.get("steps", 10)), int(options.get("warmup", 3))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"bench options {options}: {exc}; --strategies a,b --micro-batch 1,2,4 --steps N "
                          "--warmup N --checkpointing off|on|both --compile off|on|both") from exc
    if steps <= warmup or warmup < 1 or not micro or min(micro) < 1:
        raise ConfigError(f"bench: --steps {steps} must exceed --warmup {warmup} >= 1, and micro-batches be >= 1")
    return bench_points(strategies, micro, *variants), steps, warmup


def _bench(cfg, env, strategy, task, options: dict[str, str]) -> int:
    import torch

    from .performance.bench import add_estimates, format_table, run_bench, write_results

    points, steps, warmup = _bench_points(options, cfg)
    strategy.setup_environment()
    rows = run_bench(cfg, env, task, points, steps, warmup)
    if env.is_main:
        add_estimates(rows, cfg, env.world_size)
        device = torch.cuda.get_device_name(strategy.device) if strategy.device.type == "cuda" else "CPU"
        table = format_table(rows, device, env.world_size)
        written = write_results(rows, table, cfg.training.output_dir)
        print(table + f"\n\nwritten: {', '.join(str(p) for p in written.values())}", flush=True)
    _KEEP_UNTIL_EXIT.append(strategy)
    return 0


def _pop_command_options(command: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    if command == "bench":
        return _pop_bench_options(overrides)
    if command in ("eval", "predict"):
        return _pop_eval_options(overrides)
    return overrides, {}


def _pop_world_size(overrides: list[str], world_size: int | None) -> tuple[list[str], int | None]:
    """--world-size may also come after the config (argparse hands it to the overrides)."""
    rest = []
    items = iter(overrides)
    for item in items:
        if item == "--world-size":
            world_size = int(next(items))
        elif item.startswith("--world-size="):
            world_size = int(item.split("=", 1)[1])
        else:
            rest.append(item)
    return rest, world_size


def _parser() -> argparse.ArgumentParser:
    from .performance.plan_command import add_plan_parser

    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML config (a path or a built-in recipe name)")
    train.add_argument("config", help="YAML file, or a built-in recipe: trec-minilm, tiny-test")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs")
    export = sub.add_parser("export", help="write a plain HF folder (config, safetensors, tokenizer) from a "
                                           "checkpoint of any strategy, in one CPU process")
    export.add_argument("checkpoint", help="an output_dir/checkpoint-<step> folder")
    export.add_argument("out_dir", help="where to write the HF folder")
    export.add_argument("--merge", action="store_true", help="LoRA checkpoints: fold the adapter into the base "
                                                              "model and write a full HF model (default: the adapter)")
    export.add_argument("--base", default=None, help="LoRA --merge: the base model folder (default: the one the "
                                                     "adapter config names)")
    hpo = sub.add_parser("hpo", help="hyperparameter search over the config's search section (optuna; every "
                                     "launcher; resumable with a storage)")
    hpo.add_argument("config", help="YAML file with a search section")
    hpo.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs")
    est = sub.add_parser("estimate", help="predicted per-rank memory of a config under every strategy, for any "
                                          "world size (no GPU needed)")
    est.add_argument("config", help="YAML file or built-in recipe")
    est.add_argument("--world-size", type=int, default=None, help="ranks to predict for (default: 1, 2, 8, 64)")
    est.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs")
    add_plan_parser(sub)
    bench = sub.add_parser("bench", help="time a short run of the config per strategy and micro-batch (and "
                                         "with/without activation checkpointing / compile): tokens/s, TFLOP/s, MFU, "
                                         "memory vs the estimate; table and PNG in output_dir")
    bench.add_argument("config", help="YAML file or built-in recipe")
    bench.add_argument("overrides", nargs=argparse.REMAINDER,
                       help="--strategies ddp,fsdp,zero3 --micro-batch 1,2,4 --steps 10 --warmup 3 --checkpointing "
                            "off|on|both --compile off|on|both, and --field value pairs")
    for name, what in (("eval", "evaluate a checkpoint on the config's validation data"),
                       ("predict", "write a checkpoint's predictions for the config's test (or validation) data")):
        command = sub.add_parser(name, help=f"{what}, under any launcher and strategy")
        command.add_argument("config", help="YAML file or built-in recipe")
        command.add_argument("overrides", nargs=argparse.REMAINDER,
                             help="--checkpoint PATH (checkpoint-<step> or an HF folder)"
                             + (" --output preds.jsonl --split test|validation" if name == "predict" else "")
                             + ", and --field value pairs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # the deepspeed launcher appends --local_rank=N; the environment says the same
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args.checkpoint, args.out_dir, args.merge, args.base)
    if args.command == "estimate":
        overrides, world_size = _pop_world_size(args.overrides, args.world_size)
        return _estimate(args.config, world_size, overrides)
    if args.command == "plan":
        from .performance.plan_command import run_plan

        return run_plan(args.config, args.overrides, _pop_flags)
    from .checkpoint import CheckpointError

    try:
        overrides, options = _pop_command_options(args.command, args.overrides)
        cfg, env, strategy, task = _prepare(args.config, overrides, args.command, options.get("checkpoint"))
        if args.command == "bench":
            _bench_points(options, cfg)  # bad options fail here, before any process group
    except ConfigError as exc:
        _refuse(f"config error: {exc}")
        return 2
    except (ValueError, FileNotFoundError, CheckpointError, ModuleNotFoundError) as exc:  # NotSupportedError too
        _refuse(f"error: {exc}")
        return 2
    if args.command == "bench":
        return _bench(cfg, env, strategy, task, options)
    if args.command in ("eval", "predict"):
        try:
            return _evaluate_checkpoint(cfg, env, strategy, task, options, args.command)
        except (ConfigError, CheckpointError) as exc:
            _refuse(f"error: {exc}")
            return 2
    return (_hpo if args.command == "hpo" else _train)(cfg, env, strategy, task)


def _refuse(message: str) -> None:
    """Bad input is the same on every rank of a launch, so rank 0 says it. A launcher
    stops all ranks when the first one exits; the others wait, so rank 0's report
    is not cut off, and speak only if they are still running after that."""
    from .parallel.environment import launched_rank

    if launched_rank() != 0:
        time.sleep(_OTHER_RANKS_WAIT_S)
    print(f"scaletrain: {message}", file=sys.stderr, flush=True)


_OTHER_RANKS_WAIT_S = 5.0


def entrypoint() -> None:
    code = main()
    # gloo's worker threads can abort the interpreter at shutdown after a
    # process group existed (see CPU notes); leave without running finalizers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
