"""Fisher diagonals against a brute-force, one-sample-at-a-time reference."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_bert, build_tiny_gpt2, build_tiny_vit, make_reviews
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hf_deepclean.errors import DeepCleanError, DeepCleanRunError
from hf_deepclean.fisher.engine import compute_fisher_diagonal, sample_log_likelihoods


RTOL = 1e-5
# Attention key biases have an exactly zero gradient in exact arithmetic (softmax is shift-invariant), so their
# Fisher is round-off (1e-27 to 1e-21 here, against maxima of 1e-3 and more elsewhere); relative to that, any two
# summation orders differ. The scale of a comparison is therefore floored at 1e-12 times the largest entry of the
# whole diagonal.
FLOOR = 1e-12


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """`max |a - b| / max |b|`, the scale floored at `floor`."""
    scale = max(float(expected.abs().max()), floor, 1e-30)
    return float((actual - expected).abs().max()) / scale


def assert_fisher_close(actual: dict, expected: dict, rtol: float = RTOL) -> None:
    assert set(actual) == set(expected)
    floor = FLOOR * max(float(values.abs().max()) for values in expected.values())
    for name, values in expected.items():
        assert actual[name].shape == values.shape, name
        assert actual[name].dtype == torch.float32, name
        error = relative_error(actual[name], values, floor)
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


# ---------------------------------------------------------------------------------------------------------------
# The engine's per-layer rules, fallbacks and bookkeeping, each against the brute-force loop


def build_tiny_resnet(seed: int = 0):
    """Conv2d without bias, BatchNorm2d (eval mode: an affine layer), Linear head."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    return ResNetForImageClassification(config).eval()


def image_batches(sizes=(3, 2), num_labels: int = 10, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(n, 3, 8, 8, generator=generator),
            "labels": torch.randint(0, num_labels, (n,), generator=generator),
        }
        for n in sizes
    ]


def lm_batches() -> list[dict]:
    input_ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 2] = -100
    return [{"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}]


def test_cnn_matches_brute_force():
    model = build_tiny_resnet()
    batches = image_batches(num_labels=5)
    fisher = compute_fisher_diagonal(model, batches)
    assert_fisher_close(fisher, brute_force_fisher(model, batches))
    assert set(fisher) == {name for name, _ in model.named_parameters()}


def _lora_model(kind: str):
    from peft import LoraConfig, get_peft_model

    if kind == "bert":
        model, tokenizer = build_tiny_bert()
        batches = text_batches(tokenizer, make_reviews(9, seed=2), 4)
        config = LoraConfig(r=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    elif kind == "vit":
        model, _ = build_tiny_vit()
        batches = image_batches()
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "patch_embeddings.projection"])
    elif kind == "resnet":
        model = build_tiny_resnet()
        batches = image_batches(num_labels=5)
        config = LoraConfig(r=2, target_modules=["convolution"], modules_to_save=["classifier.1"])
    else:
        model = build_tiny_gpt2()
        batches = lm_batches()
        config = LoraConfig(r=2, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True)
    config.init_lora_weights = False  # random B as well as A: at peft's default (B = 0) A's Fisher is zero
    torch.manual_seed(3)
    return get_peft_model(model, config).eval(), batches


@pytest.mark.parametrize("kind", ["bert", "vit", "resnet", "gpt2"])
def test_lora_adapter_matches_brute_force(kind):
    """LoRA around Linear, Conv1D (GPT-2), Conv2d and Embedding layers; `params` = the adapter, chosen structurally."""
    from hf_deepclean.modeling import get_parameters_in_scope

    model, batches = _lora_model(kind)
    params = get_parameters_in_scope(model, "adapter")
    assert params and all("lora_" in name or "modules_to_save" in name for name in params)
    assert len(params) == sum(p.requires_grad for p in model.parameters())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    fisher = compute_fisher_diagonal(model, batches, params=params)
    assert_fisher_close(fisher, brute_force_fisher(model, batches, params=params))
    # the pass leaves the model exactly as it was, trainability included
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(params)


def test_adapter_scope_without_adapter_is_an_error(bert):
    from hf_deepclean.modeling import get_parameters_in_scope

    model, _ = bert
    with pytest.raises(DeepCleanError, match="--scope: got 'adapter'"):
        get_parameters_in_scope(model, "adapter")


class _Output:
    def __init__(self, logits):
        self.logits = logits


class _Scale(nn.Module):
    """A module the engine has no rule for: its parameters go through torch.func."""

    def __init__(self, width: int, data_dependent: bool = False):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, width))
        self.data_dependent = data_dependent

    def forward(self, x):
        if self.data_dependent and float(x.abs().sum()) < 0:  # .item() inside: vmap cannot trace it
            return x
        return torch.tanh(x * self.gain) + self.shift * x


class _Toy(nn.Module):
    """Embedding -> Linear used twice (shared) -> custom scale -> in-place edit of a saved input -> head."""

    def __init__(self, data_dependent: bool = False, inplace: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(9, 6, padding_idx=0)
        self.shared = nn.Linear(6, 6)
        self.scale = _Scale(6, data_dependent)
        self.norm = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = self.shared(torch.relu(self.shared(h)))
        h = self.norm(self.scale(h))
        pooled = h.mean(1)
        logits = self.head(pooled)
        if self.inplace:
            pooled.mul_(0.0)  # the head's saved input changes after the head read it
        return _Output(logits)


def toy_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 9, (5, 4), generator=generator)
    return [
        {"input_ids": ids[:3], "labels": torch.tensor([0, 2, 1])},
        {"input_ids": ids[3:], "labels": torch.tensor([1, 1])},
    ]


@pytest.mark.parametrize("data_dependent", [False, True], ids=["vmap", "loop"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_fallbacks_shared_layers_and_inplace_inputs(data_dependent, inplace):
    """torch.func (or the per-sample loop where vmap cannot trace), a layer called twice, a padding index, a saved
    input edited in place: all exact."""
    model = _Toy(data_dependent, inplace).eval()
    batches = toy_batches()
    assert any(bool((b["input_ids"] == 0).any()) for b in batches)
    fisher = compute_fisher_diagonal(model, batches)
    # the edit happens after the head's output is computed, so the model computes the same function without it;
    # the reference runs without it because autograd itself refuses to differentiate through such an edit
    reference = _Toy(data_dependent, inplace=False).eval()
    assert_fisher_close(fisher, brute_force_fisher(reference, batches))
    assert float(fisher["embed.weight"][0].abs().max()) == 0.0  # nn.Embedding's padding row gets no gradient


def test_chunked_and_micro_batched_results_agree():
    """A tiny memory bound splits per-sample gradients into one-sample chunks and the tied GPT-2 embedding's
    stash into one-sample micro-batches; the result must not change."""
    model = build_tiny_gpt2()
    batches = lm_batches()
    default = compute_fisher_diagonal(model, batches)
    tiny = compute_fisher_diagonal(model, batches, chunk_memory_mb=1e-4)
    assert_fisher_close(tiny, default, rtol=1e-6)
    with pytest.raises(DeepCleanError, match="--fisher_chunk_memory_mb"):
        compute_fisher_diagonal(model, batches, chunk_memory_mb=0)


def test_true_fisher_token_level_does_not_depend_on_batching():
    model = build_tiny_gpt2()
    (batch,) = lm_batches()
    whole = compute_fisher_diagonal(model, [batch], fisher_type="true", seed=5)
    singles = [{k: v[n : n + 1] for k, v in batch.items()} for n in range(batch["labels"].shape[0])]
    one_by_one = compute_fisher_diagonal(model, singles, fisher_type="true", seed=5)
    assert_fisher_close(whole, one_by_one)
    empirical = compute_fisher_diagonal(model, [batch])
    assert not torch.allclose(
        whole["lm_head.weight" if "lm_head.weight" in whole else "transformer.wte.weight"],
        empirical["lm_head.weight" if "lm_head.weight" in whole else "transformer.wte.weight"],
    )


def test_bf16_autocast_accumulates_in_float32(bert, reviews, bert_fisher):
    """Under bf16 autocast (what `Accelerator(mixed_precision="bf16")` wraps the forward in) the layers see bf16
    activations and gradients; the sums stay float32."""
    model, tokenizer = build_tiny_bert()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        fisher = compute_fisher_diagonal(model, text_batches(tokenizer, reviews, 7))
    assert set(fisher) == set(bert_fisher)
    for name, values in fisher.items():
        assert values.dtype == torch.float32 and bool(torch.isfinite(values).all()), name
    # bf16 keeps ~3 significant digits: the large entries agree to a few percent, but not exactly
    weight = "classifier.weight"
    assert 0 < relative_error(fisher[weight], bert_fisher[weight]) < 0.1


def test_two_processes_match_one(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): per-rank sums over each process's block of rows, one SUM
    reduce; equal to one process, the sampled labels of the true Fisher included."""
    from pathlib import Path

    from conftest import run_torchrun
    from fisher_worker import review_loader, token_loader
    from safetensors.torch import load_file

    from hf_deepclean.fisher.engine import accumulate_fisher_sums

    output = tmp_path / "fisher.safetensors"
    log = run_torchrun([str(Path(__file__).parent / "fisher_worker.py"), str(output)])
    assert output.exists(), log[-3000:]
    two = load_file(output)
    assert float(two.pop("__processes__")) == 2.0
    assert float(two.pop("__count__")) == 13.0  # every row once

    two_true = {name.removeprefix("true/"): two.pop(name) for name in list(two) if name.startswith("true/")}
    model, tokenizer = build_tiny_bert()
    one, count = accumulate_fisher_sums(model, review_loader(tokenizer))
    assert count == 13
    assert_fisher_close(two, one, rtol=1e-6)
    one_true, _ = accumulate_fisher_sums(build_tiny_gpt2(), token_loader(), fisher_type="true", seed=5)
    assert_fisher_close(two_true, one_true, rtol=1e-6)


class _GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.dilated = nn.Conv2d(6, 4, 2, dilation=2, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values):
        h = self.dilated(torch.tanh(self.conv(pixel_values)))
        return _Output(self.head(h.mean(dim=(2, 3))))


def test_grouped_strided_dilated_convolutions_match_brute_force():
    model = _GroupedConvNet().eval()
    generator = torch.Generator().manual_seed(2)
    batches = [{"pixel_values": torch.randn(5, 4, 9, 9, generator=generator), "labels": torch.tensor([0, 1, 2, 1, 0])}]
    assert_fisher_close(compute_fisher_diagonal(model, batches), brute_force_fisher(model, batches))


class _ConvPathsNet(nn.Module):
    """Each path of the convolution rule: unfolded patches (non-square kernel, stride, padding), a 1x1 kernel as a
    strided slice, dilation with groups, one output position (`(g²)ᵀ(a²)`), and a shared layer with one output
    position (its per-sample gradients are stashed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0))  # 7x7 -> 4x6
        self.point = nn.Conv2d(6, 6, 1, stride=2, groups=3)  # -> 2x3
        self.dilated = nn.Conv2d(6, 4, 3, dilation=2, padding=2, groups=2, bias=False)  # -> 2x3
        self.squeeze = nn.Conv2d(4, 8, 3, stride=4, padding=1, groups=2)  # -> 1x1
        self.shared = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))  # 1x1 -> 1x1, called twice
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values):
        h = torch.tanh(self.dilated(torch.tanh(self.point(torch.tanh(self.stem(pixel_values))))))
        h = self.shared(torch.tanh(self.shared(torch.tanh(self.squeeze(h)))))
        return _Output(self.head(h.flatten(1)))


@pytest.mark.parametrize("chunk_memory_mb", [256, 1e-4])
def test_convolution_rule_paths_match_brute_force(chunk_memory_mb):
    model = _ConvPathsNet().eval()
    generator = torch.Generator().manual_seed(3)
    batches = [{"pixel_values": torch.randn(6, 3, 7, 7, generator=generator), "labels": torch.tensor([0, 1, 2] * 2)}]
    fisher = compute_fisher_diagonal(model, batches, chunk_memory_mb=chunk_memory_mb)
    assert_fisher_close(fisher, brute_force_fisher(model, batches))


def test_self_check_tolerance_under_bf16_autocast_separates_rounding_from_a_wrong_rule(monkeypatch):
    """Under bf16 autocast the engine and the per-sample reference round differently (measured: 0.5-0.6% at most on
    the tiny BERT); the run's mixed-precision tolerance (3e-2) passes that and still stops a rule that is off by a
    factor of 4 on the squared gradients."""
    from hf_deepclean.errors import DeepCleanRunError
    from hf_deepclean.fisher import rules
    from hf_deepclean.fisher.check import check_fisher_engine

    model, tokenizer = build_tiny_bert()
    batch = text_batches(tokenizer, make_reviews(8, 3), 8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_fisher_engine(model.eval(), batch, rtol=3e-2).max_relative_error < 3e-2

    class DoubledLinear(rules.LinearRule):
        def backward(self, use, grad_outputs):
            super().backward(use, tuple(2 * g for g in grad_outputs))

    monkeypatch.setitem(rules.RULES, nn.Linear, DoubledLinear)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(DeepCleanRunError, match="Fisher self-check"):
        check_fisher_engine(model.eval(), batch, rtol=3e-2)
