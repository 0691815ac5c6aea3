"""TOFU / MUSE metrics of language models on hand-computed cases, the membership scores on hand-computed tensors,
and answer log-probabilities against brute force on a tiny GPT-2."""

from __future__ import annotations

import math
import zlib

import evaluate
import numpy as np
import pytest
import torch
from conftest import build_tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from hf_deepclean.bench.causal_lm_demo import build_tokenizer
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.lm_attacks import (
    answer_log_probs,
    answer_log_probs_from_ids,
    min_k_plus_plus_scores,
    min_k_plus_plus_token_scores,
    privleak,
    rouge_l_recall,
    truth_ratio_score,
    truth_ratios,
    zlib_ratio_scores,
)
from hf_deepclean.evaluation.modules import METRIC_NAMES, metric_path


LOG = math.log


def test_every_module_loads_by_path():
    for name in ("truth_ratio", "forget_quality", "model_utility", "privleak"):
        assert name in METRIC_NAMES
        assert evaluate.load(metric_path(name)).name == name


# -- truth ratio ---------------------------------------------------------------------------------------------------


def test_truth_ratio_is_the_geometric_mean_of_perturbed_over_paraphrased_probability():
    # question 1: P(paraphrase) = 0.5, perturbed 0.25 and 0.0625 -> geometric mean 0.125 -> R = 0.25
    # question 2: P(paraphrase) = 0.1, perturbed 0.2 -> R = 2
    ratios = truth_ratios([LOG(0.5), LOG(0.1)], [[LOG(0.25), LOG(0.0625)], [LOG(0.2)]])
    np.testing.assert_allclose(ratios, [0.25, 2.0], rtol=1e-12)
    # forget: mean(min(R, 1/R)) = (0.25 + 0.5) / 2; keep: mean(max(0, 1 - R)) = (0.75 + 0) / 2
    assert truth_ratio_score(ratios, forget=True) == pytest.approx(0.375)
    assert truth_ratio_score(ratios, forget=False) == pytest.approx(0.375)
    assert truth_ratio_score([1.0], forget=True) == 1.0 and truth_ratio_score([1.0], forget=False) == 0.0

    metric = evaluate.load(metric_path("truth_ratio"))
    args = {
        "paraphrased_log_prob": [LOG(0.5), LOG(0.1)],
        "perturbed_log_probs": [[LOG(0.25), LOG(0.0625)], [LOG(0.2)]],
    }
    result = metric.compute(**args, forget=True)
    assert result["truth_ratio"] == pytest.approx(0.375) and result["truth_ratio_mean"] == pytest.approx(1.125)
    assert result["ratios"] == pytest.approx([0.25, 2.0])
    with pytest.raises(DeepCleanError, match="no perturbed answers"):
        truth_ratios([0.0], [[]])


# -- forget quality ------------------------------------------------------------------------------------------------


def test_forget_quality_is_the_ks_p_value():
    metric = evaluate.load(metric_path("forget_quality"))
    # fully separated samples of 3 and 3: D = 1; exact two-sided p = 2 / C(6, 3) = 0.1
    result = metric.compute(predictions=[0.1, 0.2, 0.3], references=[0.4, 0.5, 0.6])
    assert result["ks_statistic"] == 1.0 and result["forget_quality"] == pytest.approx(0.1)
    # identical samples: D = 0, p = 1
    result = metric.compute(predictions=[0.3, 0.1, 0.2], references=[0.1, 0.2, 0.3])
    assert result == {"forget_quality": 1.0, "ks_statistic": 0.0}
    # R and 1/R (TOFU's code) give the same test
    a, b = [0.2, 0.5, 0.9, 1.5], [0.3, 1.1, 2.0, 4.0]
    inverse = metric.compute(predictions=[1 / x for x in a], references=[1 / x for x in b])
    assert inverse == pytest.approx(metric.compute(predictions=a, references=b))


# -- model utility -------------------------------------------------------------------------------------------------


def test_rouge_l_recall_comes_from_rouge_score_with_stemming():
    # LCS "the cat" of a 6-token reference: 2 / 6; "running dogs" stems to the reference "run dog": 1
    np.testing.assert_allclose(
        rouge_l_recall(["the cat", "running dogs"], ["the cat sat on the mat", "run dog"]), [1 / 3, 1.0]
    )


def test_model_utility_is_the_harmonic_mean_of_the_nine_kinds_of_numbers():
    metric = evaluate.load(metric_path("model_utility"))
    result = metric.compute(
        split=["retain", "general"],
        # retain: probability 0.5 (raw); general: 0.4 / (0.4 + 0.2 + 0.2) = 0.5 (normalised over the options)
        answer_log_prob=[LOG(0.5), LOG(0.4)],
        # truth ratios: R = 0.25 / 0.5 = 0.5 and R = 0.2 / 0.4 = 0.5, so max(0, 1 - R) = 0.5 for both
        paraphrased_log_prob=[LOG(0.5), LOG(0.4)],
        perturbed_log_probs=[[LOG(0.25)], [LOG(0.2), LOG(0.2)]],
        # ROUGE-L recall 1/3 and 1
        prediction=["the cat", "running dogs"],
        reference=["the cat sat on the mat", "run dog"],
    )
    assert result["retain_probability"] == pytest.approx(0.5) and result["general_probability"] == pytest.approx(0.5)
    assert result["retain_rouge_l_recall"] == pytest.approx(1 / 3) and result["general_rouge_l_recall"] == 1.0
    assert result["retain_truth_ratio"] == pytest.approx(0.5) and result["general_truth_ratio"] == pytest.approx(0.5)
    # 6 / (2 + 3 + 2 + 2 + 1 + 2)
    assert result["model_utility"] == pytest.approx(0.5)
    # a wrong answer as likely as the true one: truth ratio 0, utility 0
    zero = metric.compute(
        split=["retain"],
        answer_log_prob=[LOG(0.5)],
        paraphrased_log_prob=[LOG(0.5)],
        perturbed_log_probs=[[LOG(0.5)]],
        prediction=["a"],
        reference=["a"],
    )
    assert zero["retain_truth_ratio"] == 0.0 and zero["model_utility"] == 0.0


# -- PrivLeak ------------------------------------------------------------------------------------------------------


def test_privleak_is_the_auc_relative_to_the_retrained_model():
    metric = evaluate.load(metric_path("privleak"))
    # unlearned: members' losses (0.1, 0.2) below both held-out ones (1, 2): AUC 1; retrained: members 0.1, 1.0 vs
    # 0.2, 2.0: 3 of 4 pairs ordered, AUC 0.75; PrivLeak = (1 - 0.75) / 0.75
    args = {
        "predictions": [0.1, 0.2, 1.0, 2.0],
        "retrain_predictions": [0.1, 1.0, 0.2, 2.0],
        "references": [1, 1, 0, 0],
    }
    result = metric.compute(**args)
    assert result == pytest.approx({"privleak": 1 / 3, "auc_unlearned": 1.0, "auc_retrain": 0.75})
    # the same numbers read as Min-K% scores (higher = member): AUCs 0 and 0.25, PrivLeak -1
    flipped = privleak(args["predictions"], args["retrain_predictions"], args["references"], higher_is_member=True)
    assert flipped == pytest.approx({"privleak": -1.0, "auc_unlearned": 0.0, "auc_retrain": 0.25})
    with pytest.raises(DeepCleanError, match="both forget"):
        privleak([0.1], [0.2], [1])


# -- zlib ratio and Min-K%++ ---------------------------------------------------------------------------------------


def test_zlib_ratio_divides_the_loss_by_the_compressed_length():
    texts = ["a", "ab" * 100]
    lengths = [len(zlib.compress(text.encode("utf-8"))) for text in texts]
    assert lengths == [9, 13]  # zlib's header and checksum are 6 bytes
    np.testing.assert_allclose(zlib_ratio_scores([2.0, 3.0], texts), [2.0 / 9, 3.0 / 13], rtol=1e-15)
    with pytest.raises(DeepCleanError, match="zlib"):
        zlib_ratio_scores([1.0], [])


def test_min_k_plus_plus_on_a_hand_computed_distribution():
    # every position predicts (0.5, 0.25, 0.25): log-probs (-l, -2l, -2l) with l = ln 2, mu = -1.5 l,
    # E[log p^2] = 2.5 l^2, variance 0.25 l^2, sigma 0.5 l: token 0 scores (-l + 1.5 l) / 0.5 l = 1, tokens 1, 2 score -1
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(1, 5, 3).clone()
    labels = torch.tensor([[2, 0, 1, 0, -100]])  # predicted: 0, 1, 0 (and padding)
    scores, valid = min_k_plus_plus_token_scores(logits, labels)
    torch.testing.assert_close(scores, torch.tensor([[1.0, -1.0, 1.0, 0.0]]))
    assert valid.tolist() == [[True, True, True, False]]
    # k = 20%: max(1, floor(0.6)) = 1 lowest score; k = 100%: the mean of the three
    torch.testing.assert_close(min_k_plus_plus_scores(logits, labels, k=0.2), torch.tensor([-1.0]))
    torch.testing.assert_close(min_k_plus_plus_scores(logits, labels, k=1.0), torch.tensor([1.0 / 3]))
    # a one-token distribution has sigma 0: its argmax scores 0, not NaN
    certain = torch.tensor([[[0.0, -1e4], [0.0, -1e4]]])
    assert min_k_plus_plus_token_scores(certain, torch.tensor([[0, 0]]))[0].item() == 0.0


def test_min_k_plus_plus_matches_the_authors_formula_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 7), generator=generator)
    scores, _ = min_k_plus_plus_token_scores(logits, labels)
    for n in range(2):
        for t in range(6):
            p = torch.softmax(logits[n, t], -1)
            log_p = torch.log_softmax(logits[n, t], -1)
            mu = (p * log_p).sum()
            sigma = ((p * log_p**2).sum() - mu**2).sqrt()
            assert scores[n, t].item() == pytest.approx(((log_p[labels[n, t + 1]] - mu) / sigma).item(), abs=1e-5)
    # 6 tokens, k = 0.5: the mean of the 3 lowest
    expected = scores.sort(-1).values[:, :3].mean(-1)
    torch.testing.assert_close(min_k_plus_plus_scores(logits, labels, k=0.5), expected)


# -- answer log-probabilities ----------------------------------------------------------------------------------------


def _brute_force(model, question: list[int], answer: list[int]) -> float:
    logits = model(torch.tensor([question + answer])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    total = sum(log_probs[len(question) - 1 + j, token].item() for j, token in enumerate(answer))
    return total / len(answer)


def test_answer_log_probs_match_brute_force_one_sequence_at_a_time():
    model = build_tiny_gpt2()
    rng = np.random.default_rng(0)
    questions = [rng.integers(0, 11, size=n).tolist() for n in (1, 4, 2, 6, 3)]
    answers = [rng.integers(0, 11, size=n).tolist() for n in (3, 1, 5, 2, 4)]
    # batches of 2 mix lengths, so right padding is exercised
    batched = answer_log_probs_from_ids(model, questions, answers, batch_size=2, pad_id=7)
    expected = [_brute_force(model, q, a) for q, a in zip(questions, answers)]
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-5)
    with pytest.raises(DeepCleanError, match="pair 1 has 0 question"):
        answer_log_probs_from_ids(model, [[1], []], [[2], [3]])


def test_answer_log_probs_on_texts_score_exactly_the_answer_tokens():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=8, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1
    )
    model = GPT2LMHeadModel(config).eval()
    questions, answers = ["note from alice :", "my PIN is"], ["the red cat slept .", "4 8 1"]
    result = answer_log_probs(model, tokenizer, questions, answers)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in questions + answers]
    assert [len(i) for i in ids] == [4, 3, 5, 3]
    expected = [_brute_force(model, ids[0], ids[2]), _brute_force(model, ids[1], ids[3])]
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_question_scores_group_the_perturbed_answers_of_each_question():
    """Perturbed answers are scored in one flat batch and handed back per question, in order; the greedy answer is
    the argmax continuation, at most twice the true answer's tokens; no rows, no scores."""
    from hf_deepclean.evaluation.lm_attacks import greedy_answers, question_scores

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=8, n_layer=1, n_head=2, eos_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    rows = [
        {"question": "note from alice :", "answer": "the red cat", "paraphrased_answer": "the cat",
         "perturbed_answers": ["the dog", "a red car", "the lamp"]},
        {"question": "my PIN is", "answer": "4 8", "paraphrased_answer": "4 8 .", "perturbed_answers": ["1 2"]},
    ]  # fmt: skip
    scores = question_scores(model, tokenizer, rows, generate=True, batch_size=2)
    single = {
        key: [answer_log_probs(model, tokenizer, [row["question"]], [row[column]])[0] for row in rows]
        for key, column in (("answer_log_prob", "answer"), ("paraphrased_log_prob", "paraphrased_answer"))
    }
    for key, values in single.items():
        np.testing.assert_allclose(scores[key], values, rtol=0, atol=1e-5)
    for row, perturbed in zip(rows, scores["perturbed_log_probs"]):
        expected = [answer_log_probs(model, tokenizer, [row["question"]], [a])[0] for a in row["perturbed_answers"]]
        np.testing.assert_allclose(perturbed, expected, rtol=0, atol=1e-5)
    for row, prediction in zip(rows, scores["prediction"]):
        ids = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        generated = []
        for _ in range(2 * len(tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"])):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
        assert prediction == tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert scores["prediction"] == greedy_answers(
        model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows]
    )
    assert question_scores(model, tokenizer, [], generate=True) == {
        "answer_log_prob": [],
        "paraphrased_log_prob": [],
        "perturbed_log_probs": [],
        "prediction": [],
    }


def test_privleak_of_outputs_uses_min_k_and_leaves_out_empty_sequences():
    from hf_deepclean.evaluation.lm_attacks import privleak_of_outputs

    nan = math.nan
    model = {"forget": {"min_k": np.array([-0.1, -0.2, nan])}, "test": {"min_k": np.array([-1.0, -0.15, -2.0])}}
    reference = {"forget": {"min_k": np.array([-1.0, -0.5, -0.3])}, "test": {"min_k": np.array([-0.2, -0.9, nan])}}
    # kept: forget rows 0 and 1, test rows 0 and 1; higher Min-K% means member
    expected = privleak([-0.1, -0.2, -1.0, -0.15], [-1.0, -0.5, -0.2, -0.9], [1, 1, 0, 0], higher_is_member=True)
    assert privleak_of_outputs(model, reference) == expected
    assert expected["auc_unlearned"] == 0.75 and expected["auc_retrain"] == 0.25
