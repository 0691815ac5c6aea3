"""Membership-inference and gap metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from hf_deepclean.evaluation.metrics import (
    average_gap,
    membership_inference_auc,
    membership_inference_efficacy,
    split_metrics,
)


def _outputs(losses: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-sample outputs of a 10-class classifier whose true-class probability is exp(-loss)."""
    max_prob = np.exp(-losses)
    entropy = -max_prob * np.log(max_prob) - (1 - max_prob) * np.log((1 - max_prob) / 9 + 1e-12)
    return {"loss": losses, "entropy": entropy, "max_prob": max_prob, "correct": (max_prob > 0.5).astype(float)}


def test_loss_attack_auc_is_half_on_identical_distributions():
    rng = np.random.default_rng(0)
    aucs = [membership_inference_auc(rng.exponential(size=2000), rng.exponential(size=2000)) for _ in range(5)]
    assert abs(np.mean(aucs) - 0.5) < 0.02


def test_loss_attack_auc_is_one_on_separable_losses():
    assert membership_inference_auc(np.array([0.01, 0.02, 0.03]), np.array([1.0, 2.0])) == 1.0
    assert membership_inference_auc(np.array([1.0, 2.0]), np.array([0.01, 0.02, 0.03])) == 0.0


def test_efficacy_tells_members_from_non_members():
    rng = np.random.default_rng(0)
    retain = _outputs(rng.uniform(0.001, 0.05, size=500), rng)  # memorised: low loss
    test = _outputs(rng.uniform(0.5, 3.0, size=200), rng)  # unseen: high loss
    like_train = _outputs(rng.uniform(0.001, 0.05, size=100), rng)
    like_test = _outputs(rng.uniform(0.5, 3.0, size=100), rng)
    assert membership_inference_efficacy(retain, test, like_train) == 0.0
    assert membership_inference_efficacy(retain, test, like_test) == 1.0


def test_efficacy_on_indistinguishable_sets_is_near_chance():
    rng = np.random.default_rng(1)
    retain, test, forget = (_outputs(rng.exponential(size=n) + 1e-3, rng) for n in (2000, 2000, 2000))
    assert 0.3 < membership_inference_efficacy(retain, test, forget) < 0.7


def test_split_metrics_and_average_gap():
    outputs = {"correct": np.array([1.0, 0.0, 1.0, 1.0]), "loss": np.array([0.1, 2.0, 0.3, 0.2])}
    assert split_metrics("forget", outputs) == {"forget_accuracy": 0.75, "forget_loss": pytest.approx(0.65)}
    model = {"forget_accuracy": 0.9, "retain_accuracy": 1.0, "test_accuracy": 0.8, "mia_efficacy": 0.2}
    reference = {"forget_accuracy": 0.5, "retain_accuracy": 0.9, "test_accuracy": 0.8, "mia_efficacy": 0.6}
    assert average_gap(model, reference) == pytest.approx((40 + 10 + 0 + 40) / 4)
    assert average_gap(model, model) == 0.0
