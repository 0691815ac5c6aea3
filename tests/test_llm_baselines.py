"""The causal-LM baselines: their losses against hand-computed values on tiny tensors, the objective the training
loop descends, and a few steps of each on a tiny LM trained on fictitious facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_gpt2

from hf_deepclean.bench.baselines import METHODS, BaselineConfig, UnlearningInputs
from hf_deepclean.bench.benchmark import train_original
from hf_deepclean.bench.llm_baselines import (
    LANGUAGE_MODEL_METHODS,
    ForgetRetainPairs,
    PairCollator,
    UnlearningObjective,
)
from hf_deepclean.bench.scenarios import build_facts_scenario
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.lm_attacks import answer_log_probs
from hf_deepclean.unlearning.forget_losses import npo_loss, sequence_log_likelihoods, simnpo_loss


SPLITS = ("forget", "retain")


def _batches():
    forget = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100]]),
    }
    retain = {key: value.flip(0) for key, value in forget.items()}
    retain["input_ids"] = (retain["input_ids"] + 2) % 11
    retain["labels"] = torch.where(retain["labels"] >= 0, retain["input_ids"], retain["labels"])
    return forget, retain


@pytest.mark.parametrize("method", list(LANGUAGE_MODEL_METHODS))
def test_objective_is_the_method_loss(method):
    model = build_tiny_gpt2()
    forget, retain = _batches()
    config = BaselineConfig(llm_retain_weight=0.5, simnpo_gamma=0.2)
    with torch.no_grad():
        forget_loss, retain_loss = model(**forget).loss, model(**retain).loss
        inputs = {key: value for key, value in forget.items() if key != "labels"}
        log_likelihoods, lengths = sequence_log_likelihoods(model(**inputs).logits, forget["labels"])
    reference = log_likelihoods + torch.tensor([1.0, -2.0])  # the rows' reference values, indexed by forget_index
    objective = UnlearningObjective(model, method, config, reference if method == "npo" else None)
    index = torch.tensor([1, 0])
    with torch.no_grad():
        loss = objective(forget, retain, index).loss
    expected = {
        "gradient_ascent": -forget_loss,
        "gradient_difference": -forget_loss + 0.5 * retain_loss,
        "npo": npo_loss(log_likelihoods, reference[index], 0.1) + 0.5 * retain_loss,
        "simnpo": simnpo_loss(log_likelihoods, lengths, 2.5, 0.2) + 0.5 * retain_loss,
    }[method]
    torch.testing.assert_close(loss, expected)
    if method == "npo":  # the reference is the row's, not the batch position's
        assert not torch.isclose(loss, npo_loss(log_likelihoods, reference, 0.1) + 0.5 * retain_loss)


def test_pairs_read_every_retain_row_once_and_cycle_the_forget_rows():
    from datasets import Dataset

    forget = Dataset.from_dict({"text": ["f0", "f1", "f2"]})
    retain = Dataset.from_dict({"text": [f"r{i}" for i in range(7)]})
    pairs = ForgetRetainPairs(forget, retain)
    assert len(pairs) == 7
    assert [pairs[i]["forget"]["text"] for i in range(7)] == ["f0", "f1", "f2", "f0", "f1", "f2", "f0"]
    batch = PairCollator(lambda rows: [row["text"] for row in rows])([pairs[5], pairs[6]])
    assert batch["forget"] == ["f2", "f0"] and batch["retain"] == ["r5", "r6"]
    assert batch["forget_index"].tolist() == [2, 0]
    with pytest.raises(DeepCleanError, match="forget/retain rows: got 0 and 7"):
        ForgetRetainPairs(forget.select([]), retain)


def test_hyperparameters_are_checked():
    with pytest.raises(DeepCleanError, match="--npo_beta: got 0"):
        BaselineConfig(npo_beta=0)
    with pytest.raises(DeepCleanError, match="--simnpo_gamma: got -0.1"):
        BaselineConfig(simnpo_gamma=-0.1)
    with pytest.raises(DeepCleanError, match="--llm_retain_weight: got nan"):
        BaselineConfig(llm_retain_weight=float("nan"))
    assert {"gradient_ascent", "gradient_difference", "npo", "simnpo"} <= set(METHODS)


def test_a_classifier_is_refused():
    model = build_tiny_gpt2()
    inputs = UnlearningInputs(model, None, None, lambda rows: rows, Accelerator(cpu=True))
    with pytest.raises(DeepCleanError, match="--methods: got 'npo', a method for causal language models"):
        METHODS["npo"](inputs, DeepCleanConfig(), BaselineConfig())


@pytest.fixture(scope="module")
def trained_facts():
    """A tiny GPT-2 trained on 20 fictitious people; two of them are to be forgotten."""
    scenario = build_facts_scenario("facts_forget10", seed=0, epochs=12, people=20)
    return scenario, train_original(scenario, Accelerator(cpu=True), seed=0, batch_size=16)


def _answer_log_likelihood(model, scenario, rows) -> float:
    """Mean log-probability per answer token of the rows' answers given their questions."""
    questions = [row for row in rows if row["kind"] == "qa"]
    texts = [row["question"] for row in questions], [row["answer"] for row in questions]
    return float(np.mean(answer_log_probs(model, scenario.tokenizer, *texts, batch_size=64)))


@pytest.mark.parametrize("method", list(LANGUAGE_MODEL_METHODS))
def test_a_few_steps_lower_the_forget_answers_likelihood_more_than_the_retain_answers(trained_facts, method):
    scenario, inputs = trained_facts
    before = {split: _answer_log_likelihood(inputs.model, scenario, getattr(inputs, split)) for split in SPLITS}
    # a quarter of a pass over the retain rows: 4 steps of 16 pairs
    config = DeepCleanConfig(repair_epochs=0.25, learning_rate=5e-4, per_device_batch_size=16)
    model = METHODS[method](inputs, config, BaselineConfig())
    after = {split: _answer_log_likelihood(model, scenario, getattr(inputs, split)) for split in SPLITS}
    forget_drop, retain_drop = before["forget"] - after["forget"], before["retain"] - after["retain"]
    assert forget_drop > 0.05, (method, before, after)
    assert forget_drop > 2 * retain_drop, (method, before, after)
    # the trained model itself is untouched
    assert _answer_log_likelihood(inputs.model, scenario, inputs.forget) == before["forget"]
