"""The causal-LM baselines: their losses against hand-computed values on tiny tensors, the objective the training
loop descends, and a few steps of each on a tiny LM trained on fictitious facts."""

from __future__ import annotations

import math

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
    npo_loss,
    sequence_log_likelihoods,
    simnpo_loss,
)
from hf_deepclean.bench.scenarios import build_facts_scenario
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.lm_attacks import answer_log_probs


SPLITS = ("forget", "retain")


def test_sequence_log_likelihoods_sum_the_predicted_tokens():
    # vocabulary of 2; position 0 predicts (0.5, 0.5), position 1 predicts (0.75, 0.25)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]] * 2)
    labels = torch.tensor([[1, 0, 1], [0, 1, -100]])
    log_likelihoods, lengths = sequence_log_likelihoods(logits, labels)
    # row 0: log P(0 | pos 0) + log P(1 | pos 1) = log 0.5 + log 0.25; row 1: log P(1 | pos 0) = log 0.5, then padding
    torch.testing.assert_close(log_likelihoods, torch.tensor([math.log(0.125), math.log(0.5)]))
    assert lengths.tolist() == [2, 1]


def test_npo_loss_is_the_hand_computed_value_and_lowers_the_likelihood():
    log_likelihoods = torch.tensor([-2.0, -3.0], requires_grad=True)
    reference = torch.tensor([-2.5, -1.0])
    # -(2 / 0.1) * mean(log sigmoid(-0.1 * 0.5), log sigmoid(-0.1 * -2))
    #   = 10 * (log(1 + e^0.05) + log(1 + e^-0.2)) = 10 * (0.7184596 + 0.5981389)
    loss = npo_loss(log_likelihoods, reference, beta=0.1)
    assert loss.item() == pytest.approx(13.165985, abs=1e-5)
    # at the reference: (2 / beta) log 2, and dL/dlog p = (2 / n) sigmoid(0) = 1 / n > 0: descent lowers log p
    at_reference = reference.clone().requires_grad_(True)
    start = npo_loss(at_reference, reference, beta=0.1)
    assert start.item() == pytest.approx(20 * math.log(2), rel=1e-6)
    start.backward()
    torch.testing.assert_close(at_reference.grad, torch.tensor([0.5, 0.5]))
    # bounded below by 0 however unlikely the forget rows become (gradient ascent is not)
    assert 0 <= npo_loss(torch.tensor([-1e4]), torch.tensor([-1.0]), beta=0.1).item() < 1e-6


def test_simnpo_loss_normalises_by_length_and_shifts_by_gamma():
    # log p / |y| is -2 for both rows: -(2.5 / 3)(-6) - 0.5 = -(2.5 / 1)(-2) - 0.5 = 4.5
    log_likelihoods, lengths = torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])
    loss = simnpo_loss(log_likelihoods, lengths, beta=2.5, gamma=0.5)
    # -(2 / 2.5) log sigmoid(4.5) = 0.8 log(1 + e^-4.5) = 0.8 * 0.0110477
    assert loss.item() == pytest.approx(0.8 * 0.01104774, rel=1e-5)
    # gamma 0: 0.8 log(1 + e^-5) = 0.8 * 0.0067153
    assert simnpo_loss(log_likelihoods, lengths, beta=2.5, gamma=0.0).item() == pytest.approx(
        0.8 * 0.00671535, rel=1e-5
    )
    # no reference: its value depends on the model's own likelihood only, and falls as it falls
    assert simnpo_loss(torch.tensor([-30.0]), torch.tensor([3]), 2.5, 0.5) < loss


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
