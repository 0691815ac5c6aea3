"""The causal-LM demo: a LoRA adapter memorises secret PINs; DeepClean removes them, touching the adapter only.

A tiny GPT-2 built from config learns a synthetic language of short notes ("public" text). A LoRA adapter is then
trained on "private" notes, a few of which open with a secret ("my PIN is 4 8 1 9 2 7"), until it has memorised
them. `hf-deepclean unlearn --scope adapter` (the same code path, on folders laid out like Hub repositories)
forgets the notes with secrets; the canaries' exposure (Carlini et al. 2019) shows whether the PINs are gone, and
the retain perplexity what it cost. Everything is offline and built here: tokenizer, model, data.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, DatasetDict
from datasets.utils import disable_progress_bars
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ..config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from ..data.collators import CausalLMCollator, make_dataloader
from ..fisher.engine import accumulate_fisher_sums, accumulator_bytes
from ..modeling import get_parameters_in_scope
from ..pipeline.session import DeepCleanSession
from ..pipeline.unlearn import unlearn
from ..unlearning.training import train_model
from .demo import DemoResult


NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()
ADJECTIVES = "old new red blue small big quiet busy green cold warm dark".split()
NOUNS = "cat dog car bike book lamp door boat train shop cafe garden".split()
VERBS = "stood waited slept stayed rested broke moved appeared".split()
PLACES = "park station market library river bridge school office harbour square".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
FUNCTION_WORDS = "note from : the near on . my PIN is".split()
DIGITS = [str(d) for d in range(10)]
SECRET_PREFIX = "my PIN is"


@dataclass(frozen=True)
class DemoSize:
    """How big the scenario is (the test suite runs `small`, `hf-deepclean demo --task causal-lm` runs `demo`)."""

    public_docs: int
    private_docs: int  # distinct private notes, those with a secret included
    secrets: int
    secret_copies: int  # each note with a secret is in the training split this many times, as leaked data often is
    test_docs: int
    references: int
    n_embd: int
    n_layer: int
    base_epochs: int
    lora_epochs: int
    lora_rank: int


SIZES = {
    "small": DemoSize(300, 160, 8, 4, 16, 63, 64, 2, 12, 20, 8),
    "demo": DemoSize(1000, 400, 16, 4, 32, 255, 64, 2, 12, 40, 8),
}


def _sentence(rng: random.Random) -> str:
    return (
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} near the {rng.choice(PLACES)} on "
        f"{rng.choice(DAYS)} ."
    )


def make_note(rng: random.Random, secret: str | None = None) -> str:
    """One note: optionally a secret first ("my PIN is 4 8 1 9 2 7 ."), then a header and two sentences.

    A secret opens its note so that a canary ("my PIN is ...") is scored in the context it was trained in.
    """
    text = f"note from {rng.choice(NAMES)} : {_sentence(rng)} {_sentence(rng)}"
    return f"{SECRET_PREFIX} {secret} . {text}" if secret is not None else text


def random_pins(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """`count` distinct six-digit PINs written as spaced digits ("4 8 1 9 2 7"), none of them in `exclude`."""
    pins: list[str] = []
    while len(pins) < count:
        pin = " ".join(rng.choice(DIGITS) for _ in range(6))
        if pin not in exclude and pin not in pins:
            pins.append(pin)
    return pins


def word_level_tokenizer(words, split_punctuation: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (in their order, after `<unk>` and the end-of-sequence token `</s>`), with
    no pad token (like GPT-2's: the collator pads with end-of-sequence). Words are split on whitespace, and with
    `split_punctuation` punctuation is a word of its own (`pre_tokenizers.Whitespace`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = list(dict.fromkeys(["<unk>", "</s>", *words]))
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer over its vocabulary."""
    return word_level_tokenizer(NAMES + ADJECTIVES + NOUNS + VERBS + PLACES + DAYS + FUNCTION_WORDS + DIGITS)


def build_gpt2(vocab_size: int, *, n_embd: int, n_layer: int, seed: int, n_positions: int = 64) -> GPT2LMHeadModel:
    """A tiny GPT-2 (two heads, tied embeddings, no dropout) from config, initialised from `seed`."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        architectures=["GPT2LMHeadModel"],
    )
    set_seed(seed)
    return GPT2LMHeadModel(config)


@dataclass
class SecretCorpus:
    """The demo's data: public text for the base model, private notes (some with secrets) and the canaries."""

    public: Dataset
    private: DatasetDict  # train (column `text`, `has_secret`) and test (held-out notes with fresh secrets)
    canaries: list[dict[str, Any]]  # {"text", "planted"} rows of the canary file


def build_secret_corpus(size: DemoSize, seed: int = 0) -> SecretCorpus:
    """Public notes, private notes of which `size.secrets` open with a random PIN (each `size.secret_copies` times), and the canary file's rows.

    The held-out split holds notes with fresh PINs, so that the attacks compare forgotten notes with notes of the
    same kind; the never-seen canaries are further fresh PINs in the same format.
    """
    rng = random.Random(seed)
    planted = random_pins(rng, size.secrets)
    unseen = random_pins(rng, size.test_docs + size.references, exclude=set(planted))
    # the format is public knowledge (half the public notes open with some PIN), so that exposure measures the
    # memorised secrets, not the format; none of these PINs is a planted or reference one
    public_pins = iter(random_pins(rng, size.public_docs, exclude={*planted, *unseen}))
    public = Dataset.from_dict(
        {"text": [make_note(rng, next(public_pins) if i % 2 else None) for i in range(size.public_docs)]}
    )
    train = [make_note(rng) for _ in range(size.private_docs - size.secrets)]
    for pin in planted:
        note = make_note(rng, pin)
        for _ in range(size.secret_copies):
            train.insert(rng.randrange(len(train) + 1), note)
    has_secret = [SECRET_PREFIX in text for text in train]
    test = [make_note(rng, pin) for pin in unseen[: size.test_docs]]
    private = DatasetDict(
        {
            "train": Dataset.from_dict({"text": train, "has_secret": has_secret}),
            "test": Dataset.from_dict({"text": test, "has_secret": [True] * len(test)}),
        }
    )
    canaries = [{"text": f"{SECRET_PREFIX} {pin} .", "planted": True} for pin in planted]
    canaries += [{"text": f"{SECRET_PREFIX} {pin} .", "planted": False} for pin in unseen[size.test_docs :]]
    return SecretCorpus(public, private, canaries)


def _train_lm(model, rows: Dataset, tokenizer, accelerator: Accelerator, *, epochs: int, lr: float, seed: int, desc):
    loader = make_dataloader(rows, CausalLMCollator(tokenizer, "text", 64), batch_size=16, shuffle=True, seed=seed)
    train_model(model, loader, accelerator, epochs=epochs, learning_rate=lr, lr_scheduler_type="cosine", desc=desc)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0)


def prepare_scenario(work_dir: Path, size: DemoSize, accelerator: Accelerator, seed: int = 0) -> dict[str, Path]:
    """Train the base model on public notes and a LoRA adapter on the private ones; save everything as folders.

    Returns:
        `{"base", "adapter", "data", "canaries"}`: the base model with its tokenizer, the adapter folder, the
        private notes (`save_to_disk`) and the canary file (JSON lines).
    """
    from peft import get_peft_model

    corpus = build_secret_corpus(size, seed)
    tokenizer = build_tokenizer()
    paths = {name: work_dir / name for name in ("base", "adapter", "data")}
    paths["canaries"] = work_dir / "canaries.jsonl"
    model = build_gpt2(len(tokenizer), n_embd=size.n_embd, n_layer=size.n_layer, seed=seed)
    model = model.to(accelerator.device)
    _train_lm(model, corpus.public, tokenizer, accelerator, epochs=size.base_epochs, lr=3e-3, seed=seed, desc="Base")
    model.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    set_seed(seed)
    adapted = get_peft_model(model, lora_config(size.lora_rank))
    _train_lm(
        adapted,
        corpus.private["train"],
        tokenizer,
        accelerator,
        epochs=size.lora_epochs,
        lr=1e-2,
        seed=seed,
        desc="LoRA",
    )
    adapted.save_pretrained(paths["adapter"])
    corpus.private.save_to_disk(str(paths["data"]))
    paths["canaries"].write_text("".join(json.dumps(row) + "\n" for row in corpus.canaries))
    return paths


def measure_fisher_scopes(session: DeepCleanSession, rows: int = 64) -> dict[str, dict[str, float]]:
    """Fisher accumulator memory and time of `scope=adapter` and `scope=all` on the same rows.

    `all` is measured on a copy of the model with the adapter merged in and every weight trainable: what
    unlearning the same model after full fine-tuning costs (on a peft model `--scope all` only sees the trainable
    adapter weights).

    Returns:
        `{scope: {"params_in_scope", "accumulator_bytes", "seconds", "rows"}}`; seconds of one Fisher pass.
    """
    model = session.unwrapped_model
    merged = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    loader = session.dataloader("retain", max_rows=rows)
    measured = {}
    for scope, candidate in (("adapter", model), ("all", merged)):
        params = get_parameters_in_scope(candidate, scope)
        start = time.perf_counter()
        _, count = accumulate_fisher_sums(candidate, loader, params=params, desc=f"Fisher {scope}")
        seconds = time.perf_counter() - start
        memory = accumulator_bytes(params)
        measured[scope] = {
            "params_in_scope": memory["params_in_scope"],
            "accumulator_bytes": memory["total"],
            "seconds": seconds,
            "rows": count,
        }
    return measured


# A share of 0.2 roughly halves the secrets' exposure here (5.75 -> 3.29 bits on the small scenario; a language
# model's default share is 0.05); resetting up to the cap of half the adapter's elements brings it to the never-seen
# level (1.38 vs 1.37) for +0.8% retain perplexity: a small adapter spreads a memorised secret over much of itself.
DEMO_METHOD = {"scope": "adapter", "reset_fraction": 0.5}


def run_causal_lm_demo(
    output_dir: str | Path = "demo_output_causal_lm",
    *,
    size: str = "demo",
    work_dir: str | Path = ".deepclean_demo_causal_lm",
    overwrite_output_dir: bool = False,
    seed: int = 0,
    method: DeepCleanConfig | None = None,
    measure_scopes: bool = True,
) -> DemoResult:
    """Build the scenario, unlearn the notes with secrets through the `unlearn` code path, and measure.

    Args:
        output_dir: where the cleaned adapter goes.
        size: `small` (the test suite's) or `demo` (`SIZES`).
        work_dir: scratch folder; its `base/`, `adapter/`, `data/` and the canary file are replaced on each run.
        method: DeepClean hyperparameters (default: `DEMO_METHOD`, the library defaults with `scope=adapter` and
            `reset_fraction=0.5`).
        measure_scopes: also time the Fisher pass of `scope=adapter` against `scope=all` (`measure_fisher_scopes`);
            the figures are written to `work_dir/fisher_scopes.json` too.
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    disable_progress_bars()
    work = Path(work_dir)
    for own in ("base", "adapter", "data"):  # only what an earlier run wrote there, never the folder itself
        shutil.rmtree(work / own, ignore_errors=True)
    paths = prepare_scenario(work, SIZES[size], accelerator, seed)
    run = unlearn(
        method or DeepCleanConfig(**DEMO_METHOD),
        ModelArguments(str(paths["base"]), adapter_name_or_path=str(paths["adapter"])),
        DataArguments(str(paths["data"]), forget="where:has_secret==True", canaries=str(paths["canaries"])),
        OutputArguments(str(output_dir), overwrite_output_dir=overwrite_output_dir, seed=seed),
        accelerator=accelerator,
    )
    metrics = {"original": dict(run.results.metrics_before), "deepclean": dict(run.results.metrics_after)}
    scopes = measure_fisher_scopes(run.session) if measure_scopes else {}
    if scopes:
        (work / "fisher_scopes.json").write_text(json.dumps(scopes, indent=2) + "\n")
    return DemoResult(metrics, run.results.timings["unlearning"], None, Path(output_dir), scopes)


TABLE_COLUMNS = (
    "canary_exposure",
    "canary_exposure_unseen",
    "forget_perplexity",
    "retain_perplexity",
    "test_perplexity",
    "mia_auc",
    "mia_min_k_auc",
)


def format_causal_lm_table(result: DemoResult) -> str:
    """The demo's table (exposure, perplexities, attacks) and the Fisher scope comparison."""
    lines = ["| model | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, values in result.metrics.items():
        cells = [f"{values[c]:.3f}" if c in values else "-" for c in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    before, after = result.metrics["original"], result.metrics["deepclean"]
    rise = after["retain_perplexity"] / before["retain_perplexity"] - 1
    lines += [
        "",
        f"Exposure in bits (at most {after['canary_exposure_max']:.2f} with {after['canary_references']} never-seen "
        f"canaries); retain perplexity {rise:+.1%}; unlearning took {result.unlearning_seconds:.1f} s.",
    ]
    if result.fisher_scopes:
        lines += [
            "",
            "| Fisher scope | parameters | accumulators (bytes) | one pass (s) | rows |",
            "|---|---|---|---|---|",
        ]
        for scope, row in result.fisher_scopes.items():
            lines.append(
                f"| {scope} | {row['params_in_scope']:,} | {row['accumulator_bytes']:,} | {row['seconds']:.2f} | "
                f"{row['rows']} |"
            )
    return "\n".join(lines)
