"""Fisher diagonals against a brute-force, one-sample-at-a-time reference (DESIGN §2.1)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_bert, build_tiny_vit, make_reviews
from transformers import GPT2Config, GPT2LMHeadModel

from hf_deepclean.errors import DeepCleanError, DeepCleanRunError
from hf_deepclean.fisher import compute_fisher_diagonal, sample_log_likelihoods


RTOL = 1e-5
# Attention key biases have an exactly zero gradient in exact arithmetic (softmax is shift-invariant), so their
# Fisher is round-off (~1e-27 here); relative to that, any two summation orders differ. Every other maximum is >1e-13.
FLOOR = 1e-20


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`max |a - b| / max |b|`, the scale floored at `FLOOR`."""
    scale = max(float(expected.abs().max()), FLOOR)
    return float((actual - expected).abs().max()) / scale


def assert_fisher_close(actual: dict, expected: dict, rtol: float = RTOL) -> None:
    assert set(actual) == set(expected)
    for name, values in expected.items():
        assert actual[name].shape == values.shape, name
        assert actual[name].dtype == torch.float32, name
        error = relative_error(actual[name], values)
        assert error <= rtol, f"{name}: relative error {error:.3g}"


def brute_force_fisher(model, batches, params=None, fisher_type="empirical") -> dict:
    """Per sample (padding kept as in its batch): grad of log p(y|x), squared, averaged over samples.

    For `fisher_type="true"` (classification): the exact expectation `sum_c p(c|x) (d log p(c|x))^2`.
    """
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for batch in batches:
        for n in range(batch["labels"].shape[0]):
            inputs = {k: v[n : n + 1] for k, v in batch.items() if k != "labels"}
            label = batch["labels"][n]
            logits = model(**inputs).logits[0].float()
            if logits.dim() == 1:
                log_probs = torch.log_softmax(logits, dim=-1)
                if fisher_type == "true":
                    terms = [(log_probs[c], float(log_probs[c].detach().exp())) for c in range(log_probs.shape[0])]
                else:
                    terms = [(log_probs[label], 1.0)]
            else:
                # causal LM: logits at t predict the token at t + 1; sum over the non-ignored tokens
                log_likelihood = logits.new_zeros(())
                for t in range(1, label.shape[0]):
                    if label[t] != -100:
                        log_likelihood = log_likelihood + torch.log_softmax(logits[t - 1], dim=-1)[label[t]]
                terms = [(log_likelihood, 1.0)]
            for value, weight in terms:
                grads = torch.autograd.grad(value, [params[k] for k in names], retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sums[name] += weight * grad.float() ** 2
            count += 1
    return {name: total / count for name, total in sums.items()}


def text_batches(tokenizer, rows: list[dict], batch_size: int) -> list[dict]:
    """Batches padded to their own longest text, as a collator would produce."""
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = dict(tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def bert():
    return build_tiny_bert()


@pytest.fixture(scope="module")
def reviews():
    return make_reviews(14, seed=1)


@pytest.fixture(scope="module")
def bert_fisher(bert, reviews):
    """Library result with batches of one, hence no padding at all."""
    model, tokenizer = bert
    return compute_fisher_diagonal(model, text_batches(tokenizer, reviews, 1))


def test_reviews_have_padding(bert, reviews):
    """The test data really mixes lengths, so padding is exercised."""
    _, tokenizer = bert
    for batch_size in (4, 7):
        masks = [batch["attention_mask"] for batch in text_batches(tokenizer, reviews, batch_size)]
        assert all(not bool(mask.all()) for mask in masks)


@pytest.mark.parametrize("batch_size", [4, 7])
def test_bert_matches_brute_force(bert, reviews, bert_fisher, batch_size):
    model, tokenizer = bert
    batches = text_batches(tokenizer, reviews, batch_size)
    fisher = compute_fisher_diagonal(model, batches)
    expected = brute_force_fisher(model, batches)
    assert_fisher_close(fisher, expected)
    assert set(fisher) == {name for name, _ in model.named_parameters()}
    # the per-sample definition depends neither on how samples are batched nor on the padding that follows
    assert_fisher_close(fisher, bert_fisher)


def test_vit_matches_brute_force():
    model, _ = build_tiny_vit()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"pixel_values": torch.randn(n, 3, 8, 8, generator=generator), "labels": torch.randint(0, 10, (n,))}
        for n in (3, 2)
    ]
    fisher = compute_fisher_diagonal(model, batches)
    assert_fisher_close(fisher, brute_force_fisher(model, batches))
    assert set(fisher) == {name for name, _ in model.named_parameters()}


def test_params_subset(bert, reviews, bert_fisher):
    model, tokenizer = bert
    subset = {name: p for name, p in model.named_parameters() if name.startswith("classifier.")}
    assert set(subset) == {"classifier.weight", "classifier.bias"}
    fisher = compute_fisher_diagonal(model, text_batches(tokenizer, reviews, 4), params=subset)
    assert set(fisher) == set(subset)
    assert_fisher_close(fisher, {name: bert_fisher[name] for name in subset})


def test_true_fisher_is_exact_expectation(bert, reviews):
    model, tokenizer = bert
    batches = text_batches(tokenizer, reviews[:6], 4)
    fisher = compute_fisher_diagonal(model, batches, fisher_type="true")
    assert_fisher_close(fisher, brute_force_fisher(model, batches, fisher_type="true"))
    empirical = compute_fisher_diagonal(model, batches)
    assert not torch.allclose(fisher["classifier.weight"], empirical["classifier.weight"])


def test_sample_log_likelihoods_token_level():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, 0] = labels[0, 3] = -100
    labels[1, 2:] = -100
    labels[2, :] = -100
    expected = torch.zeros(3)
    for n in range(3):
        for t in range(1, 5):
            if labels[n, t] != -100:
                expected[n] += torch.log_softmax(logits[n, t - 1], dim=-1)[labels[n, t]]
    actual = sample_log_likelihoods(logits, labels)
    assert actual.shape == (3,)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    assert float(actual[2]) == 0.0


def test_sample_log_likelihoods_classification():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = torch.tensor([2, 0])
    expected = torch.stack([torch.log_softmax(logits[n], dim=-1)[labels[n]] for n in range(2)])
    torch.testing.assert_close(sample_log_likelihoods(logits, labels), expected)


def test_causal_lm_matches_brute_force():
    """A sequence's gradient is summed over its tokens before squaring; right padding carries -100 labels."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config).eval()
    input_ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batches = [{"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}]
    fisher = compute_fisher_diagonal(model, batches)
    assert_fisher_close(fisher, brute_force_fisher(model, batches))


def test_nan_model_raises_run_error(bert, reviews):
    _, tokenizer = bert
    model, _ = build_tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(DeepCleanRunError) as excinfo:
        compute_fisher_diagonal(model, text_batches(tokenizer, reviews[:4], 4))
    names = [name for name, _ in model.named_parameters()]
    assert any(repr(name) in str(excinfo.value) for name in names), str(excinfo.value)


def test_empty_dataloader_raises(bert):
    model, _ = bert
    with pytest.raises(DeepCleanError) as excinfo:
        compute_fisher_diagonal(model, [])
    # an empty data set is the user's input problem, not a failed run
    assert not isinstance(excinfo.value, DeepCleanRunError)
