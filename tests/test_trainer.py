"""Single-process behaviour of the Trainer: accumulation math, HF flow
(eval/save strategies, callbacks, early stopping), retention and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from helpers import RaggedLM, losses_of, tiny_gpt2
from scaletrain import EarlyStoppingCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from scaletrain.checkpoint import CheckpointError, latest_checkpoint


def make_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, optim="adamw_torch", strategy="single")
    base.update(kw)
    return TrainingArguments(**base)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------- accumulation
def test_k_micro_batches_equal_one_batch_on_ragged_sequences(tmp_path):
    runs = {}
    for per_device, gas in ((8, 1), (4, 2), (2, 4)):
        # SGD: the update is linear in the gradient, so 1e-6 on the weights
        # bounds the gradient error (Adam's normalisation would amplify
        # ~1e-7 noise on elements whose gradient is ~0)
        args = make_args(tmp_path / f"{per_device}", per_device_train_batch_size=per_device,
                         gradient_accumulation_steps=gas, max_steps=6, optim="sgd", learning_rate=0.5)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(48))
        trainer.train()
        runs[(per_device, gas)] = (losses_of(trainer), weights(trainer.model))
    ref_losses, ref_weights = runs[(8, 1)]
    for key in ((4, 2), (2, 4)):
        losses, w = runs[key]
        # fp32, same rows per step, only the summation grouping differs
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        assert max_diff(w, ref_weights) < 1e-6, key


def test_mean_of_micro_batch_means_would_be_detectably_wrong():
    """Guards the test above: on this data the naive normalisation differs by
    far more than the 1e-6 tolerance, so a regression to it would fail."""
    model = tiny_gpt2()
    rows = [RaggedLM(48)[i] for i in range(8)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        token_mean = model(**batch).loss.item()
        halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
        naive = float(np.mean([model(**h).loss.item() for h in halves]))
    assert abs(naive - token_mean) > 1e-3


# ---------------------------------------------------------------- flow control
class EventRecorder(transformers.TrainerCallback):  # a plain HF callback
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda args, state, control, **kw: self.events.append((name, state.global_step))
        return super().__getattribute__(name)


def test_eval_and_save_by_steps_with_an_hf_callback(tmp_path):
    recorder = EventRecorder()
    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                                                        save_strategy="steps", save_steps=3),
                      train_dataset=RaggedLM(64), eval_dataset=RaggedLM(10), callbacks=[recorder])  # seen rows
    trainer.train()
    steps_of = lambda event: [s for e, s in recorder.events if e == event]  # noqa: E731
    assert steps_of("on_evaluate") == [2, 4, 6]
    assert steps_of("on_save") == [3, 6]
    assert steps_of("on_step_end") == [1, 2, 3, 4, 5, 6]
    assert recorder.events[0][0] == "on_init_end" and recorder.events[-1][0] == "on_train_end"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]


def test_eval_and_save_by_epoch(tmp_path):
    recorder = EventRecorder()
    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, num_train_epochs=2, eval_strategy="epoch",
                                                        save_strategy="epoch"),
                      train_dataset=RaggedLM(16), eval_dataset=RaggedLM(8, seed=3), callbacks=[recorder])
    trainer.train()
    assert [s for e, s in recorder.events if e == "on_evaluate"] == [4, 8]  # 16 rows / 4 = 4 steps per epoch
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert trainer.state.epoch == 2.0


class WorseningMetric:
    """An eval metric that gets worse at every evaluation (best is the first)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pred):
        self.calls += 1
        return {"badness": float(self.calls)}


def test_early_stopping_stops(tmp_path):
    metric = WorseningMetric()
    args = make_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="badness", greater_is_better=False)
    trainer = Trainer(model=tiny_gpt2(), args=args,
                      train_dataset=RaggedLM(64), eval_dataset=RaggedLM(8, seed=3), compute_metrics=metric,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    assert metric.calls == 3  # best, worse, worse -> stop
    assert trainer.state.global_step == 6


@pytest.mark.parametrize("restore", [True, False])
def test_callback_states_are_saved_and_restored_on_request(tmp_path, restore):
    """Patience 3, a metric that never improves: an uninterrupted run stops at step 8 (evaluations 4,
    6, 8 fail to improve). Resumed at checkpoint-4 (one failure counted), the restored counter stops
    it at 8 again; a fresh counter only at 10."""
    def run(resume: bool):
        args = make_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=2, load_best_model_at_end=True, metric_for_best_model="badness",
                         greater_is_better=False, restore_callback_states_from_checkpoint=restore)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(64),
                          eval_dataset=RaggedLM(8, seed=3), compute_metrics=WorseningMetric(),
                          callbacks=[EarlyStoppingCallback(early_stopping_patience=3)])
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4") if resume else None)
        return trainer

    assert run(resume=False).state.global_step == 8
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == 1
    assert set(saved) == {"EarlyStoppingCallback", "TrainerControl"}  # as HF writes them
    assert run(resume=True).state.global_step == (8 if restore else 10)


def test_save_total_limit_keeps_best_and_latest_and_loads_best(tmp_path):
    snapshots = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = weights(model)

    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2,
                                                        save_strategy="steps", save_steps=2, save_total_limit=1,
                                                        load_best_model_at_end=True, metric_for_best_model="badness",
                                                        greater_is_better=False),
                      train_dataset=RaggedLM(64), eval_dataset=RaggedLM(8, seed=3), compute_metrics=WorseningMetric(),
                      callbacks=[Snapshot()])
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert max_diff(weights(trainer.model), snapshots[2]) == 0.0  # best weights restored exactly
    assert max_diff(snapshots[8], snapshots[2]) > 1e-4  # ...and they differ from the last step's


def test_resume_is_exact_and_skips_uncommitted(tmp_path):
    args = lambda: make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=8)  # noqa: E731
    full = Trainer(model=tiny_gpt2(), args=args(), train_dataset=RaggedLM(40))  # 5 steps/epoch: resume crosses one
    full.train()
    interrupted = tmp_path / "checkpoint-99"  # a save that died before its commit marker
    interrupted.mkdir()
    (interrupted / "manifest.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-8"

    resumed = Trainer(model=tiny_gpt2(seed=5), args=args(), train_dataset=RaggedLM(40))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert losses_of(resumed) == losses_of(full)
    assert max_diff(weights(resumed.model), weights(full.model)) == 0.0


class RecordingCollator:
    """Records the first token of every row the loader hands the trainer, in order."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, rows):
        batch = transformers.default_data_collator(rows)
        self.seen += batch["input_ids"][:, 0].tolist()
        return batch


@pytest.mark.parametrize("ignore_data_skip", [False, True])
def test_ignore_data_skip_restarts_the_epoch_on_resume(tmp_path, ignore_data_skip):
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4)
    full_rows = RecordingCollator()
    full = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, **args), train_dataset=RaggedLM(32),
                   data_collator=full_rows)  # one epoch of 8 steps: max_steps ends it early
    full.train()
    resumed_rows = RecordingCollator()
    resumed = Trainer(model=tiny_gpt2(), args=make_args(tmp_path / "r", ignore_data_skip=ignore_data_skip, **args),
                      train_dataset=RaggedLM(32), data_collator=resumed_rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    rows_per_step = 4
    assert full_rows.seen[:12] != full_rows.seen[12:24]  # the rows tell the two positions apart
    start = 0 if ignore_data_skip else 3 * rows_per_step  # HF: no skipping within the epoch
    assert resumed_rows.seen == full_rows.seen[start:start + 3 * rows_per_step]


def _timed(owner, method: str, read_after=lambda: None) -> list[tuple[float, object]]:
    """Wrap owner.method; each call appends (its duration, read_after() once it returned)."""
    import time

    real, calls = getattr(owner, method), []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = real(*args, **kwargs)
        calls.append((time.perf_counter() - started, read_after()))
        return result

    setattr(owner, method, timed)
    return calls


def test_async_save_commits_later_and_resumes_exactly(tmp_path):
    """The background write holds the state as it was at the save, although
    training changes the weights meanwhile; the commit waits for the write."""
    args = lambda: make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4,  # noqa: E731
                             per_device_train_batch_size=8, save_async=True)
    full = Trainer(model=tiny_gpt2(), args=args(), train_dataset=RaggedLM(40))
    saved_at_4 = {}
    full.add_callback(type("Snapshot", (transformers.TrainerCallback,), {
        "on_save": lambda self, a, state, control, **kw: saved_at_4.update(
            weights(full.model) if state.global_step == 4 else {})})())
    staging = _timed(full.strategy, "save_state_async")
    saves = _timed(full.checkpoints, "save", lambda: full.checkpoints.last_save_blocking_s)
    full.train()
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-8"]
    # the time training waited, per save, is at least the staging copy and at most the whole call (which also
    # waits for the previous background write), both timed from outside
    assert len(saves) == len(staging) == 2
    for staged, (called, blocking) in zip(staging, saves, strict=True):
        assert staged[0] <= blocking <= called, (staged, called, blocking)

    from scaletrain.checkpoint.export import consolidated_state_dict

    manifest = full.checkpoints.read_manifest(tmp_path / "checkpoint-4")
    on_disk = consolidated_state_dict(tmp_path / "checkpoint-4", manifest, tiny_gpt2())
    assert max((on_disk[k] - saved_at_4[k]).abs().max().item() for k in saved_at_4) == 0.0

    resumed = Trainer(model=tiny_gpt2(seed=5), args=args(), train_dataset=RaggedLM(40))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert losses_of(resumed) == losses_of(full)
    assert max_diff(weights(resumed.model), weights(full.model)) == 0.0


def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_refused_by_name(tmp_path):
    args = make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4, per_device_train_batch_size=8)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(40)).train()
    weights = tmp_path / "checkpoint-8" / "model.safetensors"  # a one-process run's model state
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated after its commit (disk full, partial copy)
    with pytest.warns(RuntimeWarning, match="checkpoint-8 is damaged"):
        assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes, \d+ were written"):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=RaggedLM(40)).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    (tmp_path / "checkpoint-4" / "scheduler.pt").unlink()
    with pytest.warns(RuntimeWarning):
        assert latest_checkpoint(tmp_path) is None


def test_resume_rejects_a_different_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=RaggedLM(16)).train()
    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(CheckpointError, match="different model configuration"):
        Trainer(model=other, args=make_args(tmp_path, max_steps=4), train_dataset=RaggedLM(16)).train(
            resume_from_checkpoint=True)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_only_model_checkpoints_export_and_evaluate_the_trained_weights_but_do_not_resume(tmp_path):
    from transformers import GPT2LMHeadModel

    from scaletrain.checkpoint.export import export_checkpoint

    def run(out, **kw):
        trainer = Trainer(model=tiny_gpt2(), args=make_args(out, max_steps=4, save_strategy="steps", save_steps=4,
                                                              **kw), train_dataset=RaggedLM(32))
        trainer.train()
        return trainer, out / "checkpoint-4"

    trained, checkpoint = run(tmp_path / "only-model", save_only_model=True)
    _, full = run(tmp_path / "full")
    # the model alone: no optimizer (a full one-process checkpoint holds it as HF's optimizer.pt), no
    # scheduler, and the manifest says so
    assert not (checkpoint / "optimizer.pt").exists() and (full / "optimizer.pt").is_file()
    assert not (checkpoint / "scheduler.pt").exists() and (full / "scheduler.pt").is_file()
    assert json.loads((checkpoint / "manifest.json").read_text())["includes_optimizer"] is False
    assert sum(len(b) for b in _files(checkpoint).values()) < 0.6 * sum(len(b) for b in _files(full).values())

    # its weights are the trained model's, bit for bit, and evaluate as it does
    model = GPT2LMHeadModel.from_pretrained(export_checkpoint(checkpoint, tmp_path / "export"))
    assert max_diff(weights(model), weights(trained.model)) == 0.0
    evaluated = Trainer(model=model, args=make_args(tmp_path / "eval"), eval_dataset=RaggedLM(8, seed=3)).evaluate()
    trained.eval_dataset = RaggedLM(8, seed=3)
    assert evaluated["eval_loss"] == trained.evaluate()["eval_loss"]

    # resuming needs the optimizer state it does not hold: refused, the checkpoint left as it was
    before = _files(checkpoint)
    with pytest.raises(CheckpointError, match="saved with save_only_model=True and holds no optimizer state"):
        Trainer(model=tiny_gpt2(), args=make_args(tmp_path / "only-model", max_steps=8, save_strategy="steps",
                                                  save_steps=4), train_dataset=RaggedLM(32)).train(
            resume_from_checkpoint=str(checkpoint))
    assert _files(checkpoint) == before


def test_a_checkpoint_of_another_format_version_is_refused_by_number_and_left_on_disk(tmp_path):
    from scaletrain.checkpoint.export import export_checkpoint

    args = lambda: make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)  # noqa: E731
    Trainer(model=tiny_gpt2(), args=args(), train_dataset=RaggedLM(32)).train()
    checkpoint = tmp_path / "checkpoint-4"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    ours = manifest["format_version"]
    for theirs in (ours + 1, "2.0-beta"):  # written by a newer scaletrain; not a number this one knows
        (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "format_version": theirs}))
        before = _files(tmp_path)
        for target in (str(checkpoint), "latest"):
            with pytest.raises(CheckpointError, match=rf"checkpoint-4 has checkpoint format {theirs}, this "
                                                       rf"scaletrain reads {ours}"):
                Trainer(model=tiny_gpt2(), args=args(), train_dataset=RaggedLM(32)).train(
                    resume_from_checkpoint=target)
        with pytest.raises(CheckpointError, match=rf"format {theirs}"):
            export_checkpoint(checkpoint, tmp_path / "export")
        assert _files(tmp_path) == before  # nothing rewritten, removed or added


# ------------------------------------------------------------------- data
class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(RaggedLM(32).rows)


def test_iterable_dataset_needs_max_steps_and_trains(tmp_path):
    with pytest.raises(ValueError, match="set max_steps"):
        Trainer(model=tiny_gpt2(), args=make_args(tmp_path), train_dataset=Stream()).train()
    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=12), train_dataset=Stream())
    assert trainer.train().global_step == 12  # 8 batches per pass: crosses into a second pass


class CountingStream(torch.utils.data.IterableDataset):
    """A plain torch stream (no state_dict): it can only be replayed."""

    def __init__(self, read: list) -> None:
        self.read = read

    def __iter__(self):
        for row in RaggedLM(32).rows:
            self.read.append(1)
            yield row


def _stream(kind: str, read: list):
    if kind == "torch":
        return CountingStream(read)
    import datasets

    rows = RaggedLM(32).rows
    ds = datasets.Dataset.from_dict({k: [r[k].tolist() for r in rows] for k in rows[0]}).to_iterable_dataset(
        num_shards=2)
    if kind == "hf-shuffle-buffer":
        ds = ds.shuffle(seed=0, buffer_size=4)

    def count(row):
        read.append(1)
        return row

    return ds.map(count).with_format("torch")


@pytest.mark.parametrize("kind", ["hf", "hf-shuffle-buffer", "torch"])
def test_mid_stream_resume_is_exact_and_seeks_when_the_stream_can(kind, tmp_path):
    """12 steps of 4 rows over a 32-row stream (two passes); fresh trainer
    resumes from step 5. An HF stream restores its saved position and reads only
    the 28 rows still to come; a stream whose position cannot be restored
    (a shuffle buffer's contents are not in its state, a plain torch stream has
    no state) is replayed from its start. Either way the losses are the same."""
    run = Trainer(model=tiny_gpt2(), args=make_args(tmp_path / "run", max_steps=12, save_strategy="steps",
                                                     save_steps=5), train_dataset=_stream(kind, []))
    run.train()
    progress = json.loads((tmp_path / "run" / "checkpoint-5" / "progress.json").read_text())
    assert (progress["stream_state"] is not None) == (kind == "hf")

    read: list = []
    resumed = Trainer(model=tiny_gpt2(), args=make_args(tmp_path / "resumed", max_steps=12),
                      train_dataset=_stream(kind, read))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))
    assert losses_of(resumed) == losses_of(run)
    if kind == "hf":
        assert len(read) == (12 - 5) * 4
    else:  # all 12 steps' rows (and what a shuffle buffer holds beyond them)
        assert len(read) >= 12 * 4


def test_a_stream_position_is_the_same_on_every_rank_and_restores_beneath_the_sharding():
    """Under the per-rank sharding each rank reads the whole stream and keeps its
    share, so the saved position is global: rank 1 of 2 restores it and goes on
    with exactly the rows it would have had (a world-size change keeps it too)."""
    from scaletrain.data.loaders import build_train_dataloader, stream_replay_reason, training_stream

    args = make_args("unused", max_steps=4)

    def loader():
        return build_train_dataloader(_stream("hf", []), None, args, rank=1, world_size=2, device=torch.device("cpu"))

    whole = [b["input_ids"] for b in loader()]
    first = loader()
    batches = iter(first)
    head = [next(batches)["input_ids"] for _ in range(2)]
    assert stream_replay_reason(first) is None
    state = training_stream(first).state_dict()
    second = loader()
    training_stream(second).load_state_dict(state)
    rest = [b["input_ids"] for b in second]
    assert len(whole) == 4 and len(head + rest) == 4
    assert all(torch.equal(a, b) for a, b in zip(whole, head + rest, strict=True))


def test_hf_dataset_unused_columns_are_dropped_and_save_model_round_trips(tmp_path):
    import datasets

    rows = RaggedLM(16).rows
    ds = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "attention_mask": [r["attention_mask"].tolist() for r in rows],
        "labels": [r["labels"].tolist() for r in rows],
        "text": [f"row {i}" for i in range(16)],  # not a forward() argument
    })
    trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=2), train_dataset=ds)
    trainer.train()
    out = trainer.save_model(str(tmp_path / "final"))
    assert (out / "model.safetensors").is_file()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(out))
    assert max_diff(weights(reloaded), weights(trainer.model)) == 0.0


def test_seq2seq_predict_with_generate(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    rows = [{"input_ids": torch.randint(2, 32, (6,)), "labels": torch.randint(2, 32, (4,))} for _ in range(5)]
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=7,
                                    per_device_eval_batch_size=2, disable_tqdm=True, strategy="single")
    trainer = Seq2SeqTrainer(model=model, args=args)
    out = trainer.predict(rows)
    # as HF's Seq2SeqTrainer: generated ids and labels padded to the model's generation config max_length (20);
    # generation_max_length=7 bounds what is generated, not the padded width (test_seq2seq_tasks compares with HF)
    assert out.predictions.shape == (5, 20) and (out.predictions[:, 7:] == 0).all()
    assert out.label_ids.shape == (5, 20)
    assert "test_loss" in out.metrics


def test_seq2seq_generation_config_is_loaded_as_hf_loads_it(tmp_path):
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    def model():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                   eos_token_id=1))
    GenerationConfig(max_length=4, num_beams=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1) \
        .save_pretrained(tmp_path / "generation")
    rows = [{"input_ids": torch.randint(2, 32, (6,)), "labels": torch.randint(2, 32, (4,))} for _ in range(5)]
    common = dict(predict_with_generate=True, generation_config=str(tmp_path / "generation"),
                  per_device_eval_batch_size=8, disable_tqdm=True, report_to="none")
    ours = Seq2SeqTrainer(model=model(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "ours"),
                                                                       strategy="single", **common))
    hf = transformers.Seq2SeqTrainer(model=model(), args=transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, **common))
    assert ours.model.generation_config.num_beams == 2  # the file replaced the model's own, as in HF
    predictions = [trainer.predict(rows).predictions for trainer in (ours, hf)]
    assert predictions[0].shape[1] <= 4
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert Seq2SeqTrainer.load_generation_config(str(tmp_path / "generation")).max_length == 4


def test_full_determinism_switches_torch_to_deterministic_kernels(tmp_path):
    try:
        trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=2, full_determinism=True),
                          train_dataset=RaggedLM(16))
        assert torch.are_deterministic_algorithms_enabled()
        trainer.train()
        again = Trainer(model=tiny_gpt2(), args=make_args(tmp_path / "again", max_steps=2, full_determinism=True),
                        train_dataset=RaggedLM(16))
        again.train()
        assert losses_of(again) == losses_of(trainer)
    finally:
        torch.use_deterministic_algorithms(False)  # a process-wide switch: the other tests run without it


def test_disable_tqdm_turns_the_progress_bar_off(tmp_path, capfd):
    bars = {}
    for disable in (False, True):
        Trainer(model=tiny_gpt2(), args=make_args(tmp_path / str(disable), max_steps=3, disable_tqdm=disable),
                train_dataset=RaggedLM(16)).train()
        bars[disable] = capfd.readouterr().err.count("3/3 [")  # the bar's last draw: 3 of 3 steps
    assert bars == {False: 1, True: 0}, bars


@pytest.mark.gpu
def test_use_cpu_trains_on_the_cpu_of_a_gpu_host(tmp_path):
    runs = {}
    for use_cpu in (True, False):
        trainer = Trainer(model=tiny_gpt2(), args=make_args(tmp_path / str(use_cpu), max_steps=2, use_cpu=use_cpu),
                          train_dataset=RaggedLM(16))
        allocated = torch.cuda.memory_allocated()
        trainer.train()
        runs[use_cpu] = ({p.device.type for p in trainer.model.parameters()}, trainer.strategy.device.type,
                         torch.cuda.memory_allocated() - allocated, losses_of(trainer))
        del trainer
    assert runs[True][:3] == ({"cpu"}, "cpu", 0)  # not a byte on the GPU
    assert runs[False][:2] == ({"cuda"}, "cuda") and runs[False][2] > 0
    np.testing.assert_allclose(runs[True][3], runs[False][3], rtol=1e-3)  # the same run (TF32 may be on)


def test_tf32_is_refused_where_the_hardware_has_none(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="tf32=True needs an Ampere"):
        make_args(tmp_path, tf32=True)
    assert make_args(tmp_path, tf32=False).tf32 is False  # nothing to switch off on a CPU


@pytest.fixture
def tf32_hardware(monkeypatch):
    """This CPU answering as an Ampere GPU would: the switch the trainer flips is torch's process-wide
    fp32 precision setting, which a CPU build has too. Put back afterwards."""
    from scaletrain.strategies import precision

    monkeypatch.setattr(precision, "is_torch_tf32_available", lambda: True)
    before = torch.backends.fp32_precision
    yield precision
    torch.backends.fp32_precision = before


def _matmul_precision_after_a_trainer(out, tf32) -> tuple[str, str]:
    Trainer(model=tiny_gpt2(), args=make_args(out, tf32=tf32), train_dataset=RaggedLM(8))
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_tf32_switches_torch_fp32_matmuls_as_hf_does(tmp_path, tf32_hardware):
    torch.backends.fp32_precision = "none"
    default = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    assert _matmul_precision_after_a_trainer(tmp_path, None) == default  # None: torch's defaults stay
    assert _matmul_precision_after_a_trainer(tmp_path, True) == ("tf32", "tf32")
    assert _matmul_precision_after_a_trainer(tmp_path, None) == ("tf32", "tf32")  # None changes nothing
    assert _matmul_precision_after_a_trainer(tmp_path, False) == ("ieee", "ieee")


# transformers' enable_tf32 is lru_cache'd: going through it, a setting applied once in a process was not
# applied again, so a Trainer with tf32=True after one with tf32=False kept IEEE matmuls
def test_tf32_is_applied_by_every_trainer_not_only_the_first_with_that_setting(tmp_path, tf32_hardware):
    for tf32 in (True, False, True):
        assert _matmul_precision_after_a_trainer(tmp_path, tf32)[0] == ("tf32" if tf32 else "ieee"), tf32


@pytest.mark.gpu
def test_tf32_makes_cuda_fp32_matmuls_use_tensor_float_32(tmp_path):
    """On an Ampere or newer GPU, against float64: the same fp32 matmul rounds its inputs to 10 mantissa bits
    with TF32 (errors ~2^13 times IEEE fp32's 23-bit ones); with IEEE fp32 it stays within ~1e-6."""
    from scaletrain.strategies import precision

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs compute capability 8.0 (Ampere) or newer")
    before = torch.backends.fp32_precision
    precision.enable_tf32.cache_clear()  # each setting below is then the first of its kind (see the xfail above)
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(2048, 2048, device="cuda", generator=g) for _ in range(2))
    exact = a.double() @ b.double()
    errors = {}
    try:
        for tf32 in (True, False):
            assert _matmul_precision_after_a_trainer(tmp_path, tf32)[0] == ("tf32" if tf32 else "ieee")
            errors[tf32] = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
    finally:
        torch.backends.fp32_precision = before
        precision.enable_tf32.cache_clear()
    assert errors[False] < 1e-5 and errors[True] > 30 * errors[False], errors
