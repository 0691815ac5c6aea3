"""Sequence-to-sequence models (BART, T5 and other encoder-decoders) end to end: `hf-deepclean unlearn` on a tiny
BART built from config, with the Fisher of `log p(target | source)` summed over target tokens as one sample."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import SPECIALS, WORDS
from datasets import Dataset, DatasetDict
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration, BertTokenizer

from hf_deepclean.cli import main
from hf_deepclean.data.collators import Seq2SeqCollator
from hf_deepclean.fisher import compute_fisher_diagonal


NAMES = ["alice", "bob", "carol", "dave"]


def build_tiny_bart(seed: int = 0) -> tuple[BartForConditionalGeneration, BertTokenizer]:
    """A 1+1-layer BART (d_model 16) and a word-level tokenizer; pad 0, [CLS] starts the decoder."""
    vocab = SPECIALS + WORDS + NAMES
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    config = BartConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id,
        forced_eos_token_id=None,
        architectures=["BartForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).eval(), tokenizer


def make_pairs(n: int, seed: int) -> list[dict]:
    """`source`: a short note naming someone; `target`: the name (a summarisation of one word)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = rng.choice(NAMES)
        words = rng.choices(WORDS[:12], k=rng.randint(2, 6))
        rows.append({"id": f"p{seed}-{i}", "source": " ".join([*words, name]), "target": name})
    return rows


@pytest.fixture(scope="module")
def seq2seq_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    model, tokenizer = build_tiny_bart()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    DatasetDict(
        {"train": Dataset.from_list(make_pairs(40, 1)), "test": Dataset.from_list(make_pairs(16, 2))}
    ).save_to_disk(str(root / "data"))
    return root


def _args(folders, output_dir, *extra):
    return [
        "unlearn",
        "--model_name_or_path",
        str(folders / "model"),
        "--dataset_name",
        str(folders / "data"),
        "--forget",
        "random:6",
        "--output_dir",
        str(output_dir),
        "--repair_epochs",
        "1",
        "--per_device_batch_size",
        "8",
        *extra,
    ]


def test_collator_gives_targets_as_labels_with_padding_ignored():
    _, tokenizer = build_tiny_bart()
    batch = Seq2SeqCollator(tokenizer, "source", "target")(
        [{"source": "the movie alice", "target": "alice"}, {"source": "a", "target": "bob carol"}]
    )
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]  # [CLS] a [SEP], padded on the right
    expected = tokenizer(text_target=["alice", "bob carol"])["input_ids"]
    assert batch["labels"][1].tolist() == expected[1]
    assert batch["labels"][0].tolist() == [*expected[0], -100]


def test_fisher_of_a_sample_is_its_target_log_likelihood_gradient_squared():
    """Brute force on the engine's seq2seq path: one sample's squared gradient of `sum_t log p(y_t | y_<t, x)`."""
    model, tokenizer = build_tiny_bart()
    rows = make_pairs(3, 5)
    batch = Seq2SeqCollator(tokenizer, "source", "target")(rows)
    fisher = compute_fisher_diagonal(model, [batch])
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for n in range(len(rows)):
        single = Seq2SeqCollator(tokenizer, "source", "target")([rows[n]])
        labels = single.pop("labels")
        logits = model(**single, labels=labels).logits
        log_p = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        model.zero_grad()
        log_p[labels != -100].sum().backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.detach() ** 2 / len(rows)
    for name, values in expected.items():
        torch.testing.assert_close(fisher[name], values, rtol=1e-5, atol=1e-10, msg=name)


def test_unlearn_a_seq2seq_model_end_to_end(tmp_path, seq2seq_folders):
    output_dir = tmp_path / "cleaned"
    assert main(_args(seq2seq_folders, output_dir)) == 0
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    after = results["metrics"]["after"]
    for key in ("forget_loss", "retain_perplexity", "test_perplexity", "mia_auc", "mia_min_k_auc"):
        assert math.isfinite(after[key]), key
    assert "forget_accuracy" not in after
    # early stopping is off by default for language models: the repair runs its whole budget
    assert results["repair"]["stopped_early"] is False
    config = json.loads((output_dir / "deepclean_config.json").read_text())
    assert config["model"]["task"] == "seq2seq-lm" and config["dataset"]["columns"] == {
        "text": "source",
        "target": "target",
    }
    assert ModelCard.load(output_dir / "README.md").data.pipeline_tag == "text2text-generation"
    # loadable, and every element outside the selection is bit-for-bit the original
    AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    original, written = (
        load_file(seq2seq_folders / "model" / "model.safetensors"),
        load_file(output_dir / "model.safetensors"),
    )
    changed = sum(int((written[name] != original[name]).sum()) for name in written)
    assert 0 < changed <= results["reset"]["total"]["reset"]


def test_seq2seq_early_stopping_watches_retain_perplexity(tmp_path, seq2seq_folders):
    """A language model's monitor watches the target tokens' perplexity: 34 retain rows in batches of 8 are 5 repair
    steps, a check after each; a tolerance no model misses stops the repair at the first check."""
    loose = ("--early_stopping", "true", "--early_stopping_perplexity_tolerance", "1e6")
    assert main(_args(seq2seq_folders, tmp_path / "out", *loose)) == 0
    repair = json.loads((tmp_path / "out" / "deepclean_results.json").read_text())["repair"]
    assert repair["stopped_early"] and repair["steps"] == 1


def test_lora_adapter_of_a_seq2seq_model(tmp_path, seq2seq_folders):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    model = AutoModelForSeq2SeqLM.from_pretrained(seq2seq_folders / "model")
    adapted = get_peft_model(
        model,
        LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapted.save_pretrained(tmp_path / "adapter")
    output_dir = tmp_path / "cleaned"
    args = _args(
        seq2seq_folders, output_dir, "--adapter_name_or_path", str(tmp_path / "adapter"), "--scope", "adapter"
    )
    assert main(args) == 0
    before, after = (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
        load_file(output_dir / "adapter_model.safetensors"),
    )
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(seq2seq_folders / "model"), output_dir)
