"""The chunked causal-LM loss: HF's ForCausalLMLoss and its gradients to fp32 rounding (prompt-masked labels,
num_items_in_batch, shift_labels), logits never materialised in training (measured in tensor bytes), HF's
behaviour everywhere else (evaluation, no labels), the Trainer's loss curve unchanged, and models or setups
it cannot serve refused by name when asked for and left alone under 'auto'."""
from __future__ import annotations

import pytest
import torch

from helpers import RaggedLM, losses_of, tiny_gpt2, tiny_llama
from scaletrain import NotSupportedError, Trainer, TrainingArguments
from scaletrain.middleware.chunked_loss import ChunkedLoss
from scaletrain.modeling import chunked_loss_obstacle
from scaletrain.parallel.environment import DistEnv
from scaletrain.parallel.layout import ParallelLayout


class _Strategy:
    """What the chunked loss asks of a strategy: one process, parameters whole outside their module's forward."""
    module_scoped_parameters = False
    layout = ParallelLayout(DistEnv(0, 1, 0, 1), dp_replicate=1, dp_shard=1, tp=1)


class _PipelineStrategy(_Strategy):
    layout = ParallelLayout(DistEnv(0, 2, 0, 2), dp_replicate=1, dp_shard=1, tp=1, pp=2)


def test_pipeline_stages_keep_the_logits_and_refuse_chunked_loss_true():
    with pytest.raises(NotSupportedError, match="pipeline parallelism computes the loss from the last stage's logits"):
        ChunkedLoss(True, 5, "fp32", False, custom_loss=False).transform_model(tiny_llama(), _PipelineStrategy())
    auto = ChunkedLoss("auto", 5, "fp32", False, custom_loss=False)
    auto.transform_model(tiny_llama(), _PipelineStrategy())
    assert auto.skipped == "pipeline parallelism computes the loss from the last stage's logits"


def _chunked(model, tokens: int = 5, mode=True):
    return ChunkedLoss(mode, tokens, "fp32", False, custom_loss=False).transform_model(model, _Strategy())


def _prompt_masked_batch(vocab: int, rows: int = 3, seq: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 11:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_chunked_loss_and_its_gradients_are_hf_s(build):
    reference, model = build(), _chunked(build())
    model.load_state_dict(reference.state_dict())
    ids, labels = _prompt_masked_batch(reference.config.vocab_size)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(40)}):
        reference.zero_grad(), model.zero_grad()
        expected = reference(input_ids=ids, labels=labels, **kwargs).loss
        got = model(input_ids=ids, labels=labels, **kwargs)
        assert got.logits is None  # never computed
        torch.testing.assert_close(got.loss, expected, rtol=1e-6, atol=1e-6)
        expected.backward(), got.loss.backward()
        for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    shifted = torch.roll(labels, -1, dims=1)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, shift_labels=shifted).loss,
                               reference(input_ids=ids, labels=labels, shift_labels=shifted).loss, rtol=1e-6, atol=0)


def test_forwards_without_labels_or_in_evaluation_keep_hf_s_logits_and_loss():
    reference, model = tiny_llama(), _chunked(tiny_llama())
    ids, labels = _prompt_masked_batch(reference.config.vocab_size)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    model.eval(), reference.eval()
    out, expected = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


def test_the_logits_are_never_all_alive_at_once():
    from scaletrain.performance.memory import TensorPeakTracker

    vocab, rows, seq = 8192, 2, 128
    logits_bytes = rows * seq * vocab * 4

    def peak(model) -> int:
        ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
        with TensorPeakTracker() as tracker:
            model(input_ids=ids, labels=ids).loss.backward()
        return tracker.peak

    full, chunked = peak(tiny_llama(vocab_size=vocab)), peak(_chunked(tiny_llama(vocab_size=vocab), tokens=32))
    # the full loss holds the fp32 logits and at least one more tensor of their size; the chunks one 32-token slice
    assert full - chunked > 1.5 * logits_bytes, (full, chunked, logits_bytes)


def test_the_trainer_s_loss_curve_and_weights_do_not_change(tmp_path):
    runs = {}
    for mode in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path / str(mode)), per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, optim="adamw_torch",
                                 logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none",
                                 chunked_loss=mode, chunked_loss_tokens=7)
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=RaggedLM(32))
        trainer.train()
        runs[mode] = trainer
    assert "chunked loss (7 tokens per chunk)" in runs[True].middleware.describe()
    torch.testing.assert_close(losses_of(runs[True]), losses_of(runs[False]), rtol=0, atol=1e-6)
    for a, b in zip(runs[False].model.parameters(), runs[True].model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_models_that_change_their_logits_before_the_loss_are_not_chunked():
    from transformers import BertConfig, BertForSequenceClassification, Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            final_logit_softcapping=30.0))
    assert "changes the logits between lm_head and the loss" in chunked_loss_obstacle(gemma2)
    with pytest.raises(NotSupportedError, match="chunked_loss=True: Gemma2ForCausalLM.forward changes the logits"):
        _chunked(gemma2)
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    middleware = ChunkedLoss("auto", 5, "fp32", False, custom_loss=False)
    middleware.transform_model(bert, _Strategy())  # auto: left as it is, saying why
    assert "BertForSequenceClassification has no plain nn.Linear LM head" in middleware.skipped
    assert middleware.describe() == ""


def test_auto_leaves_a_model_whose_layers_outweigh_its_logits_and_a_custom_compute_loss_alone(tmp_path):
    class CustomLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = dict(output_dir=str(tmp_path), max_steps=1, report_to="none", disable_tqdm=True, save_strategy="no")
    big_vocab = Trainer(model=tiny_llama(vocab_size=4096), args=TrainingArguments(**args), train_dataset=RaggedLM(8))
    small_vocab = Trainer(model=tiny_llama(), args=TrainingArguments(**args), train_dataset=RaggedLM(8))
    custom = CustomLoss(model=tiny_llama(vocab_size=4096), args=TrainingArguments(**args), train_dataset=RaggedLM(8))
    for trainer in (big_vocab, small_vocab, custom):
        trainer.train()
    assert "chunked loss (1024 tokens per chunk)" in big_vocab.middleware.describe()
    assert "the logits are not the largest activation" in _chunking(small_vocab).skipped
    assert "compute_loss is overridden" in _chunking(custom).skipped
    assert "chunked loss" not in small_vocab.middleware.describe()  # an 'auto' feature that stayed off is silent
    with pytest.raises(NotSupportedError, match="chunked_loss=True: compute_loss is overridden"):
        CustomLoss(model=tiny_llama(), args=TrainingArguments(**args, chunked_loss=True),
                   train_dataset=RaggedLM(8)).train()


def _chunking(trainer) -> ChunkedLoss:
    return next(item for item in trainer.middleware.items if isinstance(item, ChunkedLoss))


def test_a_forward_that_raises_leaves_the_head_computing_logits():
    model = _chunked(tiny_llama())
    ids, labels = _prompt_masked_batch(model.config.vocab_size)
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=ids, labels=labels[:, :3])  # labels of the wrong length: the loss fails
    hidden = torch.randn(2, 4, model.config.hidden_size)
    assert model.lm_head(hidden).shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("kw,message", [
    ({"chunked_loss": "sometimes"}, "chunked_loss='sometimes'"),
    ({"chunked_loss": 0}, "chunked_loss=0"),  # 0 == False in Python, but it is not a choice
    ({"chunked_loss_tokens": True}, "chunked_loss_tokens=True must be a positive number"),
    ({"chunked_loss_tokens": 0}, "chunked_loss_tokens=0 must be a positive number"),
])
def test_bad_options_are_refused_naming_them(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **kw)
