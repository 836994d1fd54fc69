"""Every field of transformers.TrainingArguments at the installed version is decided: honoured, with a
behaviour test named here, or refused with NotSupportedError. A field HF adds fails this test until
it is given one or the other; a test named here must exist and must set or read the field."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import transformers

from scaletrain import NotSupportedError, TrainingArguments

TESTS = Path(__file__).parent

# field -> the test (file::function) that checks its behaviour
HONOURED = {
    "output_dir": "test_hf_example_scripts.py::test_the_script_writes_what_the_hf_trainer_writes",
    "do_train": "test_hf_example_scripts.py::test_the_script_writes_what_the_hf_trainer_writes",
    "do_eval": "test_hf_example_scripts.py::test_the_script_writes_what_the_hf_trainer_writes",
    "do_predict": "test_hf_example_scripts.py::test_the_script_writes_what_the_hf_trainer_writes",
    "resume_from_checkpoint": "test_resume_real_models.py::"
                              "test_a_classifier_resumes_although_hf_set_problem_type_and_other_models_are_refused",
    "per_device_train_batch_size": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "per_device_eval_batch_size": "test_hf_fields.py::test_per_device_eval_batch_size_batches_evaluation_as_hf_does",
    "gradient_accumulation_steps": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "learning_rate": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "weight_decay": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "adam_beta1": "test_hf_fields.py::test_adam_hyperparameters_reach_the_optimizer_as_in_the_hf_trainer",
    "adam_beta2": "test_hf_fields.py::test_adam_hyperparameters_reach_the_optimizer_as_in_the_hf_trainer",
    "adam_epsilon": "test_hf_fields.py::test_adam_hyperparameters_reach_the_optimizer_as_in_the_hf_trainer",
    "max_grad_norm": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "optim": "test_optimizers.py::test_each_supported_optimizer_is_hfs_and_trains",
    "num_train_epochs": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "max_steps": "test_ddp.py::test_ddp_loss_curve_matches_single_process",
    "lr_scheduler_type": "test_references.py::test_metric_schedules_step_on_the_eval_metric_as_in_the_hf_trainer",
    "lr_scheduler_kwargs": "test_references.py::test_metric_schedules_step_on_the_eval_metric_as_in_the_hf_trainer",
    "warmup_steps": "test_references.py::test_single_process_trainer_matches_a_plain_pytorch_loop",
    "logging_strategy": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "logging_steps": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "logging_first_step": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "logging_nan_inf_filter": "test_hf_fields.py::test_nan_inf_filter_leaves_non_finite_steps_out_of_the_logged_loss",
    "eval_strategy": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "eval_steps": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "eval_delay": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "eval_on_start": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "prediction_loss_only": "test_hf_fields.py::test_logging_and_evaluation_schedules_are_hfs",
    "include_for_metrics": "test_eval_options.py::test_include_for_metrics_passes_inputs_and_losses_as_hf_does",
    "batch_eval_metrics": "test_eval_options.py::test_batch_eval_metrics_compute_per_batch_as_hf_does",
    "eval_do_concat_batches": "test_eval_options.py::"
                              "test_unconcatenated_batches_and_accumulation_steps_give_hf_predictions",
    "eval_use_gather_object": "test_eval_options.py::"
                              "test_gathering_eval_outputs_as_objects_gives_hf_predictions_and_metrics",
    "eval_accumulation_steps": "test_eval_options.py::"
                               "test_unconcatenated_batches_and_accumulation_steps_give_hf_predictions",
    "include_num_input_tokens_seen": "test_eval_options.py::"
                                     "test_input_tokens_seen_and_memory_metrics_match_the_hf_trainer",
    "skip_memory_metrics": "test_eval_options.py::test_input_tokens_seen_and_memory_metrics_match_the_hf_trainer",
    "torch_empty_cache_steps": "test_eval_options.py::test_torch_empty_cache_steps_clears_the_cache_every_n_steps",
    "save_strategy": "test_trainer.py::test_eval_and_save_by_epoch",
    "save_steps": "test_trainer.py::test_eval_and_save_by_steps_with_an_hf_callback",
    "save_total_limit": "test_trainer.py::test_save_total_limit_keeps_best_and_latest_and_loads_best",
    "save_only_model": "test_trainer.py::"
                       "test_save_only_model_checkpoints_export_and_evaluate_the_trained_weights_but_do_not_resume",
    "load_best_model_at_end": "test_trainer.py::test_save_total_limit_keeps_best_and_latest_and_loads_best",
    "metric_for_best_model": "test_trainer.py::test_save_total_limit_keeps_best_and_latest_and_loads_best",
    "greater_is_better": "test_trainer.py::test_save_total_limit_keeps_best_and_latest_and_loads_best",
    "report_to": "test_cli.py::test_wandb_offline_history_matches_jsonl",
    "run_name": "test_cli.py::test_wandb_offline_history_matches_jsonl",
    "project": "test_cli.py::test_wandb_offline_history_matches_jsonl",
    "disable_tqdm": "test_trainer.py::test_disable_tqdm_turns_the_progress_bar_off",
    "log_level": "test_hf_argparse.py::test_process_facts_and_log_levels_follow_the_launcher",
    "log_level_replica": "test_hf_argparse.py::test_process_facts_and_log_levels_follow_the_launcher",
    "log_on_each_node": "test_hf_argparse.py::test_process_facts_and_log_levels_follow_the_launcher",
    "use_cache": "test_causal_lm_predictions.py::test_use_cache_is_honoured_and_a_cache_is_never_gathered",
    "label_smoothing_factor": "test_references.py::test_label_smoothing_matches_the_hf_trainer",
    "neftune_noise_alpha": "test_memory_middleware.py::"
                           "test_neftune_adds_bounded_noise_in_training_only_and_is_removed_after",
    "full_determinism": "test_trainer.py::test_full_determinism_switches_torch_to_deterministic_kernels",
    "tf32": "test_trainer.py::test_tf32_switches_torch_fp32_matmuls_as_hf_does",
    "seed": "test_hf_fields.py::test_seed_seeds_the_model_that_model_init_builds_as_hf_does",
    "data_seed": "test_hf_fields.py::test_data_seed_orders_the_data_and_seed_does_not",
    "dataloader_drop_last": "test_hf_fields.py::test_dataloader_fields_build_the_loader_hfs_trainer_builds",
    "dataloader_num_workers": "test_hf_fields.py::test_dataloader_fields_build_the_loader_hfs_trainer_builds",
    "dataloader_pin_memory": "test_hf_fields.py::test_dataloader_fields_build_the_loader_hfs_trainer_builds",
    "dataloader_persistent_workers": "test_hf_fields.py::test_dataloader_fields_build_the_loader_hfs_trainer_builds",
    "dataloader_prefetch_factor": "test_hf_fields.py::test_dataloader_fields_build_the_loader_hfs_trainer_builds",
    "remove_unused_columns": "test_hf_fields.py::"
                             "test_remove_unused_columns_drops_what_the_model_does_not_take_as_hf_does",
    "label_names": "test_hf_fields.py::test_label_names_find_the_labels_as_hf_does",
    "ignore_data_skip": "test_trainer.py::test_ignore_data_skip_restarts_the_epoch_on_resume",
    "restore_callback_states_from_checkpoint": "test_trainer.py::"
                                               "test_callback_states_are_saved_and_restored_on_request",
    "train_sampling_strategy": "test_hf_fields.py::test_group_by_length_groups_each_step_and_shards_like_one_process",
    "length_column_name": "test_hf_fields.py::test_group_by_length_reads_the_length_column_hf_names",
    "use_cpu": "test_trainer.py::test_use_cpu_trains_on_the_cpu_of_a_gpu_host",  # a gpu test: on a CPU host it is moot
    "local_rank": "test_hf_argparse.py::test_local_rank_from_an_old_launcher_is_parsed_and_the_environment_decides",
    "bf16_full_eval": "test_eval_options.py::test_full_eval_casts_the_model_outside_training_as_hf_does",
    "fp16_full_eval": "test_eval_options.py::test_full_eval_casts_the_model_outside_training_as_hf_does",
    "use_liger_kernel": "test_hf_fields.py::test_liger_kernels_are_refused_before_launch_where_they_cannot_run",
    "liger_kernel_config": "test_hf_fields.py::test_liger_kernels_are_refused_before_launch_where_they_cannot_run",
    "save_on_each_node": "test_save_on_each_node.py::test_each_node_writes_whole_checkpoints_and_resumes_from_its_own",
    "enable_jit_checkpoint": "test_preemption.py::test_jit_checkpoint_commits_on_sigterm_and_train_returns_as_hf_does",
    "parallelism_config": "test_parallel_layout.py::"
                          "test_hsdp_shards_over_dp_shard_replicates_over_dp_replicate_and_matches_one_process",
    "torch_compile": "test_compile.py::test_inductor_compiled_training_matches_eager_in_one_process",
    "torch_compile_backend": "test_compile.py::test_compile_mode_and_backend_reach_torch_compile",
    "torch_compile_mode": "test_compile.py::test_compile_mode_and_backend_reach_torch_compile",
    "optim_args": "test_references.py::test_other_optimizers_match_the_hf_trainer",
    "optim_target_modules": "test_references.py::test_other_optimizers_match_the_hf_trainer",
    "ddp_backend": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "ddp_timeout": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "ddp_find_unused_parameters": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "ddp_bucket_cap_mb": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "ddp_broadcast_buffers": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "ddp_static_graph": "test_ddp.py::test_ddp_fields_reach_the_wrapper_and_the_process_group",
    "fsdp": "test_strategy_options.py::test_hf_fsdp_arguments_map_onto_fsdp2",
    "fsdp_config": "test_strategy_options.py::test_hf_fsdp_arguments_map_onto_fsdp2",
    "deepspeed": "test_strategy_options.py::test_a_deepspeed_config_picks_the_stage_when_strategy_is_auto",
    "bf16": "test_memory_middleware.py::test_mixed_precision_tracks_the_fp32_loss_curve",
    "fp16": "test_memory_middleware.py::test_fp16_overflow_skips_the_step_and_halves_the_scale",
    "activation_checkpointing": "test_memory_middleware.py::"
                                "test_activation_checkpointing_fields_drop_activations_and_keep_the_losses",
    "activation_checkpointing_kwargs": "test_memory_middleware.py::"
                                       "test_activation_checkpointing_fields_drop_activations_and_keep_the_losses",
    "gradient_checkpointing": "test_memory_middleware.py::test_hf_gradient_checkpointing_names_still_work",
    "gradient_checkpointing_kwargs": "test_memory_middleware.py::test_hf_gradient_checkpointing_names_still_work",
    "auto_find_batch_size": "test_memory_middleware.py::"
                            "test_single_process_finder_picks_a_fitting_batch_and_trains_like_the_chosen_config",
}

# field -> a value other than its default, which must be refused by name
REFUSED = {
    "accelerator_config": {"split_batches": True},
    "average_tokens_across_devices": False,
    "dataloader_in_order": False,
    "dataloader_multiprocessing_context": "spawn",
    "debug": "underflow_overflow",
    "push_to_hub": True,
    "hub_always_push": True,
    "hub_model_id": "user/model",
    "hub_private_repo": True,
    "hub_revision": "main",
    "hub_strategy": "end",
    "hub_token": "hf_token",
    "trackio_bucket_id": "bucket",
    "trackio_space_id": "space",
    "trackio_static_space_id": "space",
}


def test_every_hf_field_is_honoured_with_a_test_or_refused():
    hf_fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    undecided = hf_fields - set(HONOURED) - set(REFUSED)
    assert not undecided, f"new HF fields, neither tested here nor refused: {sorted(undecided)}"
    assert not set(HONOURED) & set(REFUSED)
    assert not (set(HONOURED) | set(REFUSED)) - hf_fields, "fields HF no longer has"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_field_names_itself(name):
    with pytest.raises(NotSupportedError, match=rf"TrainingArguments\.{name}="):
        TrainingArguments(output_dir="out", **{name: REFUSED[name]})


def _test_sources() -> dict[str, str]:
    """test id -> the source a field must appear in: the test (with its decorators), the module-level
    helpers it names, and the scripts under tests/scripts its file runs."""
    sources = {}
    for path in TESTS.glob("test_*.py"):
        text = path.read_text()
        tree = ast.parse(text)
        helpers = {_name(node): ast.get_source_segment(text, node) for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))}
        runs_scripts = '"scripts"' in text  # a test file that runs the scripts under tests/scripts
        scripts = "".join(p.read_text() for p in (TESTS / "scripts").glob("*.py")) if runs_scripts else ""
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                own = "".join(ast.get_source_segment(text, d) for d in node.decorator_list) + helpers[node.name]
                sources[f"{path.name}::{node.name}"] = _with_named_helpers(own, helpers) + scripts
    return sources


def _name(node: ast.stmt) -> str:
    return node.name if hasattr(node, "name") else ast.unparse(node.targets[0])


def _with_named_helpers(source: str, helpers: dict[str, str]) -> str:
    """`source` plus the helpers (fixtures, jobs, constants) it names, and those they name."""
    seen: set[str] = set()
    while True:
        named = {h for h in helpers if h not in seen and re.search(rf"\b{h}\b", source)}
        if not named:
            return source
        seen |= named
        source += "".join(helpers[h] for h in sorted(named))


def test_each_honoured_field_is_set_or_read_by_its_test():
    sources = _test_sources()
    missing = sorted(test for test in set(HONOURED.values()) if test not in sources)
    assert not missing, f"tests named in HONOURED that do not exist: {missing}"
    unused = sorted(name for name, test in HONOURED.items() if not re.search(rf"\b{name}\b", sources[test]))
    assert not unused, f"fields their named test never mentions: {unused}"
