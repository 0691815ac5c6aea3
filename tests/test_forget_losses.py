"""The forget losses (`hf_deepclean.unlearning.forget_losses`): SimNPO's and NPO's preference losses on hand-computed
values, and the forget terms of DeepClean's forget-ascent repair on tiny models of each kind (classifier, causal LM,
encoder-decoder)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_bert, build_tiny_gpt2
from transformers import BartConfig, BartForConditionalGeneration

from hf_deepclean.config import FORGET_LOSSES, DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.unlearning.forget_losses import (
    FORGET_TERMS,
    SIMNPO_BETA,
    ascent_term,
    forget_term,
    npo_loss,
    sequence_log_likelihoods,
    simnpo_loss,
    simnpo_term,
)


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


def test_sequence_log_likelihoods_of_a_classifier_are_the_label_log_probabilities():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # (0.25, 0.75) and (0.5, 0.5)
    log_likelihoods, lengths = sequence_log_likelihoods(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(log_likelihoods, torch.tensor([math.log(0.75), math.log(0.5)]))
    assert lengths.tolist() == [1, 1]


def one_row_simnpo(loss: torch.Tensor) -> torch.Tensor:
    """SimNPO's term of a single row from the model's mean token loss `-log p(y) / |y|`: `-(2 / beta) log sigmoid(beta
    loss)` (gamma 0)."""
    return -(2.0 / SIMNPO_BETA) * F.logsigmoid(SIMNPO_BETA * loss)


def tiny_bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=12, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16, dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


def batches(kind: str) -> tuple[torch.nn.Module, list[dict]]:
    """A tiny model and two single-row batches of different label lengths."""
    if kind == "classifier":
        model, _ = build_tiny_bert()
        ids = [torch.tensor([[2, 5, 6, 3]]), torch.tensor([[2, 7, 3, 0]])]
        labels = [torch.tensor([1]), torch.tensor([0])]
        return model, [{"input_ids": i, "attention_mask": (i != 0).long(), "labels": y} for i, y in zip(ids, labels)]
    model = build_tiny_gpt2() if kind == "causal" else tiny_bart()
    labels = [torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9, -100, -100, -100]])]
    ids = [torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9, 0, 0, 0]])]
    return model, [{"input_ids": i, "attention_mask": (y != -100).long(), "labels": y} for i, y in zip(ids, labels)]


def stack(rows: list[dict]) -> dict:
    return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}


@pytest.mark.parametrize("kind", ["classifier", "causal", "seq2seq"])
def test_simnpo_term_is_the_mean_of_each_rows_term_from_the_models_own_loss(kind):
    model, rows = batches(kind)
    with torch.no_grad():
        # one row: log p(y) / |y| is minus the model's mean token loss, whatever the shift of its architecture
        singles = [one_row_simnpo(model(**row).loss) for row in rows]
        for row, single in zip(rows, singles):
            torch.testing.assert_close(simnpo_term(model, row), single)
        # two rows of different lengths, padding left out: the mean of the rows' terms
        torch.testing.assert_close(simnpo_term(model, stack(rows)), torch.stack(singles).mean())
        torch.testing.assert_close(ascent_term(model, rows[0]), -model(**rows[0]).loss)


def test_simnpo_gradient_fades_once_a_row_is_forgotten_and_ascent_does_not():
    def gradient(loss_of, log_likelihood: float) -> float:
        value = torch.tensor([log_likelihood], requires_grad=True)
        loss_of(value).backward()
        return value.grad.item()

    simnpo = lambda value: simnpo_loss(value, torch.tensor([1]), SIMNPO_BETA, 0.0)  # noqa: E731
    ascent = lambda value: value.mean()  # -L = log p: its gradient is 1 however unlikely the row  # noqa: E731
    # d/dlog p of -(2 / beta) log sigmoid(-beta log p) = 2 sigmoid(beta log p): 1 at log p = 0, ~0 once forgotten
    assert gradient(simnpo, 0.0) == pytest.approx(1.0)
    assert gradient(simnpo, -10.0) == pytest.approx(2 * torch.sigmoid(torch.tensor(-25.0)).item())
    assert gradient(ascent, -10.0) == pytest.approx(1.0)


def test_unknown_forget_loss_is_refused_with_the_argument():
    assert tuple(FORGET_TERMS) == FORGET_LOSSES  # every name the config accepts has a term
    with pytest.raises(DeepCleanError, match=r"^--forget_loss: got 'npo'; expected one of ascent, simnpo\.$"):
        forget_term("npo")
    with pytest.raises(DeepCleanError, match=r"^--forget_loss: got 'npo'; expected one of"):
        DeepCleanConfig(forget_loss="npo")
    # a forget term without a weight would silently be the plain repair
    with pytest.raises(
        DeepCleanError, match=r"^--forget_ascent_weight: got 0; expected > 0 with --forget_loss simnpo\.$"
    ):
        DeepCleanConfig(forget_loss="simnpo")
    assert DeepCleanConfig(forget_loss="simnpo", forget_ascent_weight=1.0).forget_loss == "simnpo"
