"""seq2seq on the user's files and against HF's Seq2SeqTrainer: a warm-startable BERT2BERT learns a
word-by-word translation on 2 ranks; training losses, generated predictions and BLEU agree across
single / ddp / fsdp / zero3; generate()'s output has the shapes and padding HF returns for the same
model and data, with the generation settings given each way HF accepts them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import task_data
from test_tasks import TINY_BERT, evaluations, scaletrain, summary, write_config


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny BERT (random weights, MiniLM's tokenizer) saved as users' pretrained checkpoints are."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from scaletrain.tasks.base import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         **TINY_BERT)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _warm_started(tiny_bert: str):
    from transformers import AutoTokenizer

    from scaletrain.args.run_config import ModelConfig, RunConfig
    from scaletrain.tasks.models import model_builders

    cfg = RunConfig(task="seq2seq", model=ModelConfig(name_or_path=tiny_bert, encoder_decoder=True))
    torch.manual_seed(0)
    load, _ = model_builders(cfg, tiny_bert, AutoTokenizer.from_pretrained(tiny_bert))
    return load()


def test_encoder_decoder_warm_starts_both_halves_from_one_checkpoint(tiny_bert):
    from transformers import AutoTokenizer, BertModel

    model, bert, tokenizer = _warm_started(tiny_bert), BertModel.from_pretrained(tiny_bert), \
        AutoTokenizer.from_pretrained(tiny_bert)
    for half in (model.encoder.embeddings, model.decoder.bert.embeddings):
        torch.testing.assert_close(half.word_embeddings.weight, bert.embeddings.word_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.bert.encoder.layer[0].attention.self.query.weight,
                               bert.encoder.layer[0].attention.self.query.weight, rtol=0, atol=0)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    assert model.config.decoder.is_decoder and model.config.decoder.add_cross_attention


@pytest.fixture(scope="module")
def bert2bert(tmp_path_factory, tiny_bert) -> str:
    """The warm-started BERT2BERT saved once: every strategy starts from the same weights (the new
    cross-attention weights drawn under ZeRO-3's partitioned construction would differ)."""
    folder = tmp_path_factory.mktemp("bert2bert")
    _warm_started(tiny_bert).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return str(folder)


def _translation_run(folder, model: str, strategy: str, ranks: int) -> dict:
    paths = task_data.write_translation_jsonl(folder)
    config = write_config(folder, "seq2seq", {"name_or_path": model},
                          {"train_file": str(paths["train"]), "validation_file": str(paths["validation"]),
                           "test_file": str(paths["validation"]), "source_column": "en", "target_column": "fr",
                           "max_length": 16},
                          num_train_epochs=3, strategy=strategy, per_device_train_batch_size=8 // ranks,
                          predict_with_generate=True, generation_max_length=12)
    scaletrain(["train", str(config)], folder, ranks=ranks)
    records = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r], "evaluations": evaluations(folder),
            "summary": summary(folder),
            "predictions": [json.loads(line)["text"] for line in
                            (folder / "out" / "predictions.jsonl").read_text().splitlines()],
            "references": [json.loads(line)["fr"] for line in paths["validation"].read_text().splitlines()]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bert2bert) -> dict:
    return {strategy: _translation_run(tmp_path_factory.mktemp(strategy), bert2bert, strategy, ranks)
            for strategy, ranks in (("single", 1), ("ddp", 2), ("fsdp", 2), ("zero3", 2))}


def test_translation_is_learned_and_scored_with_sacrebleu(runs):
    run = runs["ddp"]
    before, after = run["evaluations"][0], run["evaluations"][-1]
    assert before["step"] == 0 and before["eval_bleu"] < 5.0
    assert after["eval_bleu"] > 60.0 and after["eval_chrf"] > 80.0, after
    # predictions decoded back to text; the BERT tokenizer is uncased, as are the references
    exact = sum(p == r for p, r in zip(run["predictions"], run["references"], strict=True)) / len(run["references"])
    assert exact >= 0.6, list(zip(run["predictions"], run["references"], strict=True))[:5]


def test_two_ranks_train_like_one_process_and_every_strategy_generates_the_same(runs):
    single = runs["single"]
    for strategy in ("ddp", "fsdp", "zero3"):
        # fp32: the global batch is the same 8 rows, split over 2 ranks; only reduction order differs
        np.testing.assert_allclose(runs[strategy]["losses"], single["losses"], rtol=2e-4, err_msg=strategy)
        assert runs[strategy]["predictions"] == single["predictions"], strategy
        assert runs[strategy]["summary"]["eval_metrics"]["eval_bleu"] == pytest.approx(
            single["summary"]["eval_metrics"]["eval_bleu"], abs=1e-6)


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                               d_kv=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                               dropout_rate=0.0))


class _Pad:
    """What _pad_tensors_to_max_len reads from a processing class."""
    pad_token_id = 0
    eos_token_id = 1


def _rows(n: int = 10, decoder_prompt: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        row = {"input_ids": torch.randint(2, 40, (5 + i % 4,), generator=g).tolist()}
        row["attention_mask"] = [1] * len(row["input_ids"])
        labels = torch.randint(2, 40, (3 + i % 3,), generator=g).tolist() + [1]
        if decoder_prompt:  # a test set: a fixed decoder prompt to continue, no labels
            row["decoder_input_ids"] = [0, 7, 9]
        else:
            row["labels"] = labels
        rows.append(row)
    return rows


def _collate(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        width = max(len(r[key]) for r in rows)
        fill = -100 if key == "labels" else 0
        out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
    return out


def _predict(library: str, tmp_path, rows, gen_kwargs: dict, **args):
    import transformers

    import scaletrain

    module = transformers if library == "hf" else scaletrain
    extra = {"use_cpu": True} if library == "hf" else {"strategy": "single"}
    training_args = module.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / library), per_device_eval_batch_size=4, predict_with_generate=True,
        report_to="none", disable_tqdm=True, **extra, **args)
    trainer = module.Seq2SeqTrainer(model=_tiny_t5(), args=training_args, data_collator=_collate,
                                    processing_class=_Pad())
    return trainer.predict(rows, **gen_kwargs)


GENERATION = {
    "model defaults (max_length 20)": ({}, {}),
    "generation_max_length": ({}, {"generation_max_length": 7}),
    "max_new_tokens at predict()": ({"max_new_tokens": 4}, {}),
    "num_beams from the arguments": ({}, {"generation_num_beams": 2, "generation_max_length": 6}),
    "generation_config as a folder": ({}, {"generation_config": "FOLDER"}),
}


@pytest.mark.parametrize("case", sorted(GENERATION))
def test_generated_ids_shapes_and_padding_equal_hf_seq2seq_trainer(tmp_path, case):
    from transformers import GenerationConfig

    gen_kwargs, args = GENERATION[case]
    if args.get("generation_config") == "FOLDER":
        GenerationConfig(max_length=9, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).save_pretrained(
            tmp_path / "generation")
        args = {"generation_config": str(tmp_path / "generation")}
    rows = _rows()
    theirs = _predict("hf", tmp_path, rows, gen_kwargs, **args)
    ours = _predict("scaletrain", tmp_path, rows, gen_kwargs, **args)
    assert ours.predictions.shape == theirs.predictions.shape
    np.testing.assert_array_equal(ours.predictions, theirs.predictions)
    np.testing.assert_array_equal(ours.label_ids, theirs.label_ids)
    # the loss is the mean over all targets (HF averages batch means; docs/guides/hf-differences.md), from a
    # plain forward per row
    assert ours.metrics["test_loss"] == pytest.approx(_mean_target_loss(rows), rel=1e-5)


def _mean_target_loss(rows: list[dict]) -> float:
    model, total, count = _tiny_t5().eval(), 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * labels.numel()
            count += labels.numel()
    return total / count


def test_a_decoder_prompt_is_kept_for_generation_as_hf_keeps_it(tmp_path):
    rows = _rows(decoder_prompt=True)
    theirs = _predict("hf", tmp_path, rows, {"max_new_tokens": 3})
    ours = _predict("scaletrain", tmp_path, rows, {"max_new_tokens": 3})
    np.testing.assert_array_equal(ours.predictions, theirs.predictions)
    assert (ours.predictions[:, :3] == [0, 7, 9]).all()  # generation continued the prompt
