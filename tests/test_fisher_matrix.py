"""Architecture matrix: the Fisher engine on tiny random models of many Hugging Face families, against per-sample
autograd (one forward and backward pass per sample) to 1e-5 relative, or refused with one line.

Every model is built offline from its config class (hidden 16, 1-2 layers, small vocabulary). Text batches mix
lengths (right padding); language models carry -100 labels on padding and on a few real tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from hf_deepclean.errors import DeepCleanError, DeepCleanRunError
from hf_deepclean.fisher import RULES, FisherReport, accumulate_fisher_sums, check_fisher_engine, register_rule
from hf_deepclean.fisher.check import reference_fisher_sums, relative_errors
from hf_deepclean.fisher.rules import LinearRule


RTOL = 1e-5
VOCAB = 40
SMALL = {"vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
TEXT = {**SMALL, "num_hidden_layers": 1, "max_position_embeddings": 32}
DECODER = {**TEXT, "num_key_value_heads": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DROPOUT_OFF = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class _Output:
    def __init__(self, logits):
        self.logits = logits


class _SeqFirstAttention(nn.Module):
    """`nn.MultiheadAttention` in its default sequence-first layout, on a classifier head."""

    def __init__(self, batch_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        padding = None if attention_mask is None else attention_mask == 0
        if not self.batch_first:
            h = h.transpose(0, 1)
        h, _ = self.attention(h, h, h, key_padding_mask=padding, need_weights=False)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return _Output(self.head(h[:, 0]))


class _ReusedWeight(nn.Module):
    """A Linear whose weight is also used through `F.linear` outside its call (a hand-written tied projection)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.proj(self.embed(input_ids)))
        h = torch.tanh(nn.functional.linear(h, self.proj.weight))  # the same weight again, no module call
        return _Output(self.head(h.mean(1)))


def _text_batch(n: int = 4, length: int = 7, pad: int = 0, lm: bool = False, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=generator)
    lengths = torch.tensor([length, length - 3, length - 1, 2, length - 2, 3][:n])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    if lm:
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 3] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.randint(0, 3, (n,), generator=generator)
    return batch


def _image_batch(n: int = 3, size: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=generator), "labels": torch.tensor([0, 2, 1])[:n]}


def _classifier(config_class: str, model_class: str, **kwargs):
    def build():
        config = getattr(transformers, config_class)(num_labels=3, **kwargs)
        model = getattr(transformers, model_class)(config)
        return model, _text_batch(pad=getattr(config, "pad_token_id", None) or 0)

    return build


def _causal_lm(config_class: str, model_class: str, **kwargs):
    def build():
        config = getattr(transformers, config_class)(**kwargs)
        model = getattr(transformers, model_class)(config)
        return model, _text_batch(pad=getattr(config, "pad_token_id", None) or 0, lm=True)

    return build


def _seq2seq(config_class: str, model_class: str, **kwargs):
    def build():
        config = getattr(transformers, config_class)(**kwargs)
        model = getattr(transformers, model_class)(config)
        batch = _text_batch(pad=config.pad_token_id)
        target = _text_batch(n=4, length=5, pad=config.pad_token_id, lm=True, seed=1)
        batch["labels"] = target["labels"]  # log p(target | source), summed over the target's tokens
        return model, batch

    return build


def _image_classifier(config_class: str, model_class: str, size: int = 16, **kwargs):
    def build():
        config = getattr(transformers, config_class)(num_labels=3, **kwargs)
        return getattr(transformers, model_class)(config), _image_batch(size=size)

    return build


def _custom(module_class, **kwargs):
    def build():
        return module_class(**kwargs), _text_batch()

    return build


LLAMA_LIKE = {**DECODER, "tie_word_embeddings": False}
# family -> builder; every builder seeds nothing itself (the test does)
FAMILIES = {
    # sequence classification
    "bert": _classifier("BertConfig", "BertForSequenceClassification", **TEXT, **DROPOUT_OFF),
    "roberta": _classifier("RobertaConfig", "RobertaForSequenceClassification", **TEXT, **DROPOUT_OFF),
    "xlm-roberta": _classifier("XLMRobertaConfig", "XLMRobertaForSequenceClassification", **TEXT, **DROPOUT_OFF),
    "albert": _classifier(
        "AlbertConfig",
        "AlbertForSequenceClassification",
        **{**TEXT, "num_hidden_layers": 2},
        embedding_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
    ),
    "distilbert": _classifier(
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        vocab_size=VOCAB,
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
    ),
    "electra": _classifier(
        "ElectraConfig", "ElectraForSequenceClassification", **TEXT, embedding_size=8, **DROPOUT_OFF
    ),
    "deberta": _classifier(
        "DebertaConfig",
        "DebertaForSequenceClassification",
        **TEXT,
        **DROPOUT_OFF,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        max_relative_positions=8,
    ),
    "deberta-v2": _classifier(
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        **TEXT,
        **DROPOUT_OFF,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        position_buckets=4,
        max_relative_positions=8,
        position_biased_input=False,
    ),
    "mpnet": _classifier("MPNetConfig", "MPNetForSequenceClassification", **TEXT, **DROPOUT_OFF),
    "modernbert": _classifier(
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        **{**TEXT, "num_hidden_layers": 2},
        global_attn_every_n_layers=2,
        local_attention=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    ),
    # causal language models, dense
    "gpt2": _causal_lm(
        "GPT2Config",
        "GPT2LMHeadModel",
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "llama": _causal_lm("LlamaConfig", "LlamaForCausalLM", **LLAMA_LIKE),
    "mistral": _causal_lm("MistralConfig", "MistralForCausalLM", **LLAMA_LIKE, sliding_window=4),
    "qwen2": _causal_lm("Qwen2Config", "Qwen2ForCausalLM", **DECODER),
    "qwen3": _causal_lm("Qwen3Config", "Qwen3ForCausalLM", **DECODER, head_dim=8),
    "gemma": _causal_lm("GemmaConfig", "GemmaForCausalLM", **DECODER, head_dim=8),
    "gemma2": _causal_lm("Gemma2Config", "Gemma2ForCausalLM", **DECODER, head_dim=8, sliding_window=4),
    "phi3": _causal_lm("Phi3Config", "Phi3ForCausalLM", **LLAMA_LIKE),
    "phi": _causal_lm("PhiConfig", "PhiForCausalLM", **DECODER),
    "stablelm": _causal_lm("StableLmConfig", "StableLmForCausalLM", **DECODER),
    "olmo": _causal_lm("OlmoConfig", "OlmoForCausalLM", **LLAMA_LIKE),
    "starcoder2": _causal_lm("Starcoder2Config", "Starcoder2ForCausalLM", **DECODER, residual_dropout=0.0),
    "opt": _causal_lm(
        "OPTConfig",
        "OPTForCausalLM",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    ),
    "gpt-neox": _causal_lm("GPTNeoXConfig", "GPTNeoXForCausalLM", **TEXT, hidden_dropout=0.0, attention_dropout=0.0),
    "gpt-neo": _causal_lm(
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=2,
        max_position_embeddings=32,
        window_size=4,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
    ),
    "gptj": _causal_lm(
        "GPTJConfig",
        "GPTJForCausalLM",
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        rotary_dim=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "bloom": _causal_lm(
        "BloomConfig",
        "BloomForCausalLM",
        vocab_size=VOCAB,
        hidden_size=16,
        n_layer=1,
        n_head=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "falcon": _causal_lm(
        "FalconConfig",
        "FalconForCausalLM",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # causal language models, mixture of experts
    "mixtral": _causal_lm(
        "MixtralConfig", "MixtralForCausalLM", **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2-moe": _causal_lm(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        **DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    # sequence to sequence
    "t5": _seq2seq(
        "T5Config",
        "T5ForConditionalGeneration",
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        decoder_start_token_id=0,
    ),
    "bart": _seq2seq(
        "BartConfig",
        "BartForConditionalGeneration",
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        decoder_start_token_id=2,
    ),
    # image classification
    "vit": _image_classifier(
        "ViTConfig",
        "ViTForImageClassification",
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **DROPOUT_OFF,
    ),
    "swin": _image_classifier(
        "SwinConfig",
        "SwinForImageClassification",
        image_size=16,
        patch_size=2,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=2,
        drop_path_rate=0.0,
    ),
    "convnext": _image_classifier(
        "ConvNextConfig",
        "ConvNextForImageClassification",
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        patch_size=2,
    ),
    "resnet": _image_classifier(
        "ResNetConfig",
        "ResNetForImageClassification",
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
    ),
    "mobilenet-v2": _image_classifier(
        "MobileNetV2Config",
        "MobileNetV2ForImageClassification",
        size=32,
        image_size=32,
        depth_multiplier=0.25,
        classifier_dropout_prob=0.0,
    ),
    # plain PyTorch
    "multihead-attention": _custom(_SeqFirstAttention),
    "multihead-attention-batch-first": _custom(_SeqFirstAttention, batch_first=True),
    "reused-weight": _custom(_ReusedWeight),
}
# families whose Fisher the engine refuses, with the words its one-line error must contain (none at present: the
# exact path covers every family above)
REFUSED: dict[str, str] = {}


def _build(family: str):
    torch.manual_seed(0)
    model, batch = FAMILIES[family]()
    return model.eval(), batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_per_sample_autograd(family):
    model, batch = _build(family)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if family in REFUSED:
        with pytest.raises(DeepCleanError) as excinfo:
            accumulate_fisher_sums(model, [dict(batch)], params=params)
        assert REFUSED[family] in str(excinfo.value) and "\n" not in str(excinfo.value)
        return
    report = FisherReport()
    sums, count = accumulate_fisher_sums(model, [dict(batch)], params=params, report=report)
    assert count == batch["labels"].shape[0]
    expected = reference_fisher_sums(model, batch, params)
    assert set(sums) == set(params)
    errors = relative_errors(sums, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{family}: {worst} relative error {errors[worst]:.3g} ({report.exact_path})"
    # the parameters that no sample uses really have a zero Fisher
    assert all(float(sums[name].abs().max()) == 0.0 for name in report.unused)


# ---------------------------------------------------------------------------------------------------------------
# Layouts the shapes alone cannot tell apart, refusals, and the self-check


class _SequenceFirstEncoder(nn.Module):
    """`nn.TransformerEncoderLayer` in its sequence-first layout: its Linear layers see `[T, N, d]`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.layer(self.embed(input_ids).transpose(0, 1)).transpose(0, 1)
        return _Output(self.head(h.mean(1)))


class _SharedRow(nn.Module):
    """A position table computed once for the batch (`[1, T, d]`) and used through `[0]`, not by broadcasting."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.positions = nn.Embedding(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        table = self.positions(torch.arange(input_ids.shape[1])[None, :])
        h = torch.tanh(self.embed(input_ids) * table[0])
        return _Output(self.head(h.mean(1)))


@pytest.mark.parametrize("build", [_SequenceFirstEncoder, _SharedRow], ids=["sequence-first-T-equals-N", "row-0"])
def test_layouts_that_shapes_cannot_tell_are_exact(build):
    """`[T, N, d]` with `T == N` passes every shape check: the reverse-order probe sends it to the exact path."""
    torch.manual_seed(0)
    model = build().eval()
    batch = _text_batch(n=4, length=4)
    params = dict(model.named_parameters())
    report = FisherReport()
    sums, _ = accumulate_fisher_sums(model, [dict(batch)], params=params, report=report)
    errors = relative_errors(sums, reference_fisher_sums(model, batch, params))
    assert max(errors.values()) <= RTOL, errors
    assert report.exact_path  # these layouts cannot go through the per-layer rules


def test_batch_statistics_are_refused_in_one_line():
    model = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=3)
    ).eval()
    model.resnet.embedder.embedder.normalization.track_running_stats = False
    with pytest.raises(DeepCleanError) as excinfo:
        accumulate_fisher_sums(model, [_image_batch()])
    message = str(excinfo.value)
    assert "BatchNorm2d" in message and "--scope" in message and "\n" not in message


class _Doubled(nn.Linear):
    """A Linear of its own type, to register a wrong rule for."""


class _DoubledRule(LinearRule):
    """Deliberately wrong: every per-sample gradient doubled."""

    def backward(self, use, grad_outputs):
        super().backward(use, [2 * g for g in grad_outputs])


def test_self_check_passes_and_reports_its_cost():
    model, batch = _build("llama")
    report = FisherReport()
    sums, _ = accumulate_fisher_sums(model, [dict(batch)], check=True, report=report)
    assert report.check is not None and report.check.samples == 4
    assert report.check.max_relative_error <= 1e-4 and report.check.seconds > 0
    check = check_fisher_engine(model, batch, fisher_type="true", samples=2)
    assert check.samples == 2 and check.max_relative_error <= 1e-4


def test_self_check_catches_a_broken_rule():
    torch.manual_seed(0)
    model = _ReusedWeight().eval()
    model.head = _Doubled(16, 3)
    register_rule(_Doubled, _DoubledRule)
    try:
        with pytest.raises(DeepCleanRunError) as excinfo:
            check_fisher_engine(model, _text_batch())
        message = str(excinfo.value)
        assert "'head.weight'" in message or "'head.bias'" in message, message
        assert "_Doubled" in message and "\n" not in message
        with pytest.raises(DeepCleanRunError, match="self-check"):
            accumulate_fisher_sums(model, [_text_batch()], check=True)
    finally:
        RULES.pop(_Doubled)


# ---------------------------------------------------------------------------------------------------------------
# Later batches that differ from the first: every check holds for each micro-batch, not only for the first


class _SometimesReused(nn.Module):
    """Uses `proj.weight` again through `F.linear`, outside `proj`'s call, only when every sample starts with an even
    token (the batches below start all odd or all even, so each sample alone takes its batch's branch): the same
    modules are called, with the same shapes, either way."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.proj(self.embed(input_ids)))
        if bool((input_ids[:, 0] % 2 == 0).all()):
            h = torch.tanh(nn.functional.linear(h, self.proj.weight))
        return _Output(self.head(h.mean(1)))


class _SometimesRow(nn.Module):
    """A position table `[1, T, d]` met by broadcasting on short batches, used through `[0]` on longer ones."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.positions = nn.Embedding(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        table = self.positions(torch.arange(input_ids.shape[1])[None, :])
        h = self.embed(input_ids)
        h = torch.tanh(h + table if input_ids.shape[1] < 6 else h * table[0])
        return _Output(self.head(h.mean(1)))


class _Dispatch(nn.Module):
    """Tokens with an even id go through `expert` as `[k, d]` rows (dispatched, as in a mixture of experts): a batch
    where `k` equals the number of samples passes every shape check with rows that are tokens, not samples."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.expert = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        chosen = input_ids % 2 == 0
        h = h.masked_scatter(chosen[..., None], torch.tanh(self.expert(h[chosen])))
        return _Output(self.head(h.mean(1)))


def _ids_batch(ids: list[list[int]], seed: int) -> dict:
    ids = torch.tensor(ids)
    labels = torch.randint(0, 3, (ids.shape[0],), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


LATER_BATCHES = {
    # the first batch's shapes send the sequence-first layer to the exact path; the second has T == N
    "sequence-first-then-T-equals-N": (
        _SequenceFirstEncoder,
        lambda: [_text_batch(n=3, length=4, seed=1), _text_batch(n=4, length=4, seed=2)],
        "layer.linear1.weight",
    ),
    "parameter-reused-only-later": (
        _SometimesReused,
        lambda: [
            _ids_batch([[3, 4, 5], [7, 8, 9], [9, 10, 11]], 1),
            _ids_batch([[4, 5, 6], [8, 9, 10], [12, 3, 5]], 2),
        ],
        "proj.weight",
    ),
    "shared-row-broadcast-then-indexed": (
        _SometimesRow,
        lambda: [_text_batch(n=4, length=4, seed=1), _text_batch(n=4, length=7, seed=2)],
        "positions.weight",
    ),
    # 5 even tokens among 3 samples, then 3 even tokens among 3 samples, two of them in the first sample
    "dispatched-rows-then-k-equals-N": (
        _Dispatch,
        lambda: [
            _ids_batch([[4, 6, 3], [8, 5, 7], [10, 12, 9]], 1),
            _ids_batch([[4, 6, 3], [8, 5, 7], [9, 11, 13]], 2),
        ],
        "expert.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(LATER_BATCHES))
def test_later_batches_that_differ_from_the_first_stay_exact(case):
    """A later batch takes a branch, shape or dispatch the first did not: the sums over both batches stay exact, and
    the parameters concerned take the exact path (or, for the shared row, are not expanded over the batch)."""
    build, batches, concerned = LATER_BATCHES[case]
    torch.manual_seed(0)
    model = build().eval()
    batches = batches()
    params = dict(model.named_parameters())
    report = FisherReport()
    sums, count = accumulate_fisher_sums(model, [dict(b) for b in batches], params=params, report=report)
    assert count == sum(b["labels"].shape[0] for b in batches)
    expected = [reference_fisher_sums(model, b, params) for b in batches]
    errors = relative_errors(sums, {name: sum(e[name] for e in expected) for name in params})
    assert max(errors.values()) <= RTOL, (errors, report.exact_path)
    if case != "shared-row-broadcast-then-indexed":
        assert concerned in report.exact_path, report.exact_path


class _OwnParameter(nn.Parameter):
    """A parameter class of its own (as quantisation libraries have): the engine leaves its class alone."""


class _Tagged(torch.Tensor):
    """Activations of a class of their own with a `__torch_function__`, which sees calls before a parameter's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class _TaggedReusedWeight(_ReusedWeight):
    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.proj(self.embed(input_ids).as_subclass(_Tagged)))
        h = torch.tanh(nn.functional.linear(h, self.proj.weight))
        return _Output(self.head(h.mean(1)).as_subclass(torch.Tensor))


def test_tensors_of_their_own_class_are_watched_too():
    """Activations of a class with its own `__torch_function__` meet the parameters: every call is watched instead,
    and the weight reused through `F.linear` still takes the exact path."""
    torch.manual_seed(0)
    model, batch = _TaggedReusedWeight().eval(), _text_batch()
    params = dict(model.named_parameters())
    report = FisherReport()
    sums, _ = accumulate_fisher_sums(model, [dict(batch)], params=params, report=report)
    errors = relative_errors(sums, reference_fisher_sums(model, batch, params))
    assert max(errors.values()) <= RTOL, errors
    assert "proj.weight" in report.exact_path
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_parameters_of_their_own_class_are_watched_too():
    """With a parameter in scope of a class other than `nn.Parameter`, every torch call of the forward pass is
    watched instead of the parameters alone: the weight reused through `F.linear` still takes the exact path; and
    every parameter has its own class again afterwards."""
    model, batch = _build("reused-weight")
    model.embed.weight = _OwnParameter(model.embed.weight.detach().clone())
    params = dict(model.named_parameters())
    classes = {name: type(p) for name, p in params.items()}
    report = FisherReport()
    sums, _ = accumulate_fisher_sums(model, [dict(batch)], params=params, report=report)
    errors = relative_errors(sums, reference_fisher_sums(model, batch, params))
    assert max(errors.values()) <= RTOL, errors
    assert "proj.weight" in report.exact_path
    assert {name: type(p) for name, p in model.named_parameters()} == classes


@pytest.mark.parametrize("family", ["bert", "gpt2", "resnet", "reused-weight", "multihead-attention"])
def test_plain_models_watch_their_parameters_not_every_call(family, monkeypatch):
    """Parameters of class `nn.Parameter` and plain activations: no `TorchFunctionMode` (which would cost every torch
    call of every forward pass) is entered."""
    from hf_deepclean.fisher import layout

    entered = []
    monkeypatch.setattr(layout.Watch, "__enter__", lambda self: entered.append(self))
    model, batch = _build(family)
    accumulate_fisher_sums(model, [dict(batch)])
    assert not entered
