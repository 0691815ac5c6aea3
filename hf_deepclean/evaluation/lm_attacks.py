"""Language-model unlearning measured as TOFU and MUSE measure it: answer log-probabilities, the TOFU metrics, MUSE's
PrivLeak and two more membership scores.

Everything but `answer_log_probs` works on per-sample quantities a caller provides, so the local `evaluate`
modules (`truth_ratio`, `forget_quality`, `model_utility`, `privleak`) need no model. Log-probabilities of an
answer are *mean log-probabilities per answer token* (`log P(a|q) / |a|`), TOFU's length normalisation.

- `answer_log_probs`: mean log-probability of the answer tokens given the question (teacher forcing).
- `truth_ratios`: TOFU's `R_truth` per question (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for
  LLMs"): `R_truth = (prod_i P(a_i|q)^(1/|a_i|))^(1/|A_pert|) / P(a~|q)^(1/|a~|)`, the geometric
  mean of the length-normalised probabilities of the perturbed (wrong) answers `a_i` over that of the paraphrased
  answer `a~`, i.e. `exp(mean_i lp(a_i) - lp(a~))`.
- `truth_ratio_score`: TOFU's aggregate: `mean(min(R, 1/R))` on forget questions, `mean(max(0, 1 - R))` elsewhere.
- `forget_quality`: p-value of the two-sample Kolmogorov-Smirnov test between the truth ratios of the unlearned
  and of the retrained model on the forget questions (TOFU).
- `model_utility`: harmonic mean of the answer probability, ROUGE-L recall and truth-ratio score on each set that
  must be kept (TOFU: retain, real authors, world facts; 9 numbers).
- `privleak`: MUSE's PrivLeak (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):
  `(AUC_unlearned - AUC_retrain) / AUC_retrain`, AUCs of a membership attack telling forget samples
  from held-out ones.
- `zlib_ratio_scores`: Carlini et al. 2021 ("Extracting Training Data from Large Language Models"): a sequence's
  mean token loss over the length in bytes of its zlib-compressed text; lower means "member".
- `min_k_plus_plus_scores`: Min-K%++ of Zhang et al. 2024 ("Min-K%++: Improved Baseline for Detecting
  Pre-Training Data from Large Language Models"); higher means "member".
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp
from torch import nn

from ..errors import DeepCleanError
from .causal_lm import MIN_K_FRACTION, min_k_scores, token_log_likelihoods
from .metrics import membership_inference_auc


# --------------------------------------------------------------------------------------------------------------
# Answer log-probabilities (teacher forcing)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_log_probs_from_ids(
    model: nn.Module,
    question_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> np.ndarray:
    """Mean log-probability of each answer's tokens given its question, by teacher forcing.

    Question and answer ids are concatenated as they are (no separator, no special token), padded on the right,
    and only the answer tokens are scored: token `t` of the answer is predicted from the question and the answer's
    tokens before `t`.

    Args:
        model: a causal LM (its output has `.logits`), in eval mode.
        question_ids: token ids of each question (at least one: the first answer token needs a context).
        answer_ids: token ids of each answer (at least one).
        batch_size: sequences per forward pass.
        pad_id: id written on padding (masked out, so any valid id).

    Returns:
        `[N]` float64: `log P(answer | question) / len(answer)` per pair.
    """
    if len(question_ids) != len(answer_ids):
        raise DeepCleanError(f"answer_log_probs: got {len(question_ids)} questions and {len(answer_ids)} answers.")
    for i, (question, answer) in enumerate(zip(question_ids, answer_ids)):
        if not len(question) or not len(answer):
            raise DeepCleanError(
                f"answer_log_probs: pair {i} has {len(question)} question and {len(answer)} answer tokens; "
                "expected at least one of each."
            )
    device = next(model.parameters()).device
    results: list[np.ndarray] = []
    for start in range(0, len(question_ids), batch_size):
        pairs = list(zip(question_ids[start : start + batch_size], answer_ids[start : start + batch_size]))
        length = max(len(q) + len(a) for q, a in pairs)
        input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (question, answer) in enumerate(pairs):
            end = len(question) + len(answer)
            input_ids[row, :end] = torch.tensor([*question, *answer], dtype=torch.long)
            attention_mask[row, :end] = 1
            labels[row, len(question) : end] = torch.tensor(list(answer), dtype=torch.long)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        log_probs, valid = token_log_likelihoods(logits, labels.to(device))
        results.append((log_probs.sum(-1) / valid.sum(-1)).double().cpu().numpy())
    return np.concatenate(results) if results else np.zeros(0)


def answer_log_probs(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
    separator: str = " ",
) -> np.ndarray:
    """`answer_log_probs_from_ids` on texts: question and `separator + answer` are tokenised apart (no special
    tokens), so the answer's tokens are exactly those scored, whatever the tokenizer does at the boundary.

    Returns:
        `[N]` float64: mean log-probability per answer token, given the question.
    """
    question_ids = tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([separator + answer for answer in answers], add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return answer_log_probs_from_ids(model, question_ids, answer_ids, batch_size, pad_id or 0)


# the columns of a question row (TOFU-style data, such as `hf_deepclean.bench.facts`)
QA_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answers")


def is_question_row(row: Mapping) -> bool:
    """Whether TOFU's metrics can read `row`: a question, its answer, a paraphrase and at least one perturbed answer
    (a biography row of the facts scenario has none)."""
    return all(row.get(column) for column in QA_COLUMNS)


def greedy_answers(
    model: nn.Module, tokenizer, questions: Sequence[str], answers: Sequence[str], separator: str = " "
) -> list[str]:
    """The model's greedy continuation of each question, one question at a time (no padding), for at most twice as
    many tokens as the true answer (`separator + answer`) has, stopped at end of sequence; decoded without special
    tokens and stripped."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    predictions = []
    for question, answer in zip(questions, answers):
        ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        budget = 2 * len(tokenizer(separator + answer, add_special_tokens=False)["input_ids"])
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max(budget, 1),
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        predictions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip())
    return predictions


@torch.no_grad()
def question_scores(
    model: nn.Module, tokenizer, rows: Sequence[Mapping], *, generate: bool = False, batch_size: int = 8
) -> dict[str, list]:
    """What TOFU's metrics read of a model on question rows (`QA_COLUMNS`), in their order.

    Returns:
        `answer_log_prob`, `paraphrased_log_prob` (floats) and `perturbed_log_probs` (a list per row): mean
        log-probabilities per answer token given the question (`answer_log_probs`); with `generate`, also
        `prediction`, the greedy answer (`greedy_answers`).
    """
    if not rows:  # a process's share of a few questions may be empty
        return {key: [] for key in ("answer_log_prob", "paraphrased_log_prob", "perturbed_log_probs")} | (
            {"prediction": []} if generate else {}
        )
    questions = [row["question"] for row in rows]
    perturbed = [list(row["perturbed_answers"]) for row in rows]
    flat = answer_log_probs(
        model,
        tokenizer,
        [question for question, answers in zip(questions, perturbed) for _ in answers],
        [answer for answers in perturbed for answer in answers],
        batch_size,
    ).tolist()
    ends = np.cumsum([len(answers) for answers in perturbed]).tolist()
    scores = {
        key: answer_log_probs(model, tokenizer, questions, [row[column] for row in rows], batch_size).tolist()
        for key, column in (("answer_log_prob", "answer"), ("paraphrased_log_prob", "paraphrased_answer"))
    }
    scores["perturbed_log_probs"] = [flat[end - len(answers) : end] for answers, end in zip(perturbed, ends)]
    if generate:
        scores["prediction"] = greedy_answers(model, tokenizer, questions, [row["answer"] for row in rows])
    return scores


# --------------------------------------------------------------------------------------------------------------
# TOFU (Maini et al. 2024)
# --------------------------------------------------------------------------------------------------------------


def truth_ratios(paraphrased_log_probs: Sequence[float], perturbed_log_probs: Sequence[Sequence[float]]) -> np.ndarray:
    """TOFU's `R_truth` per question: `exp(mean_i lp(perturbed_i) - lp(paraphrased))`.

    Args:
        paraphrased_log_probs: mean log-probability per token of each question's paraphrased (or true) answer.
        perturbed_log_probs: the same for each question's perturbed (wrong) answers, at least one per question.
    """
    paraphrased = np.asarray(paraphrased_log_probs, np.float64)
    if len(perturbed_log_probs) != len(paraphrased):
        raise DeepCleanError(
            f"truth ratio: got {len(paraphrased)} paraphrased and {len(perturbed_log_probs)} perturbed answer sets."
        )
    if any(len(values) == 0 for values in perturbed_log_probs):
        raise DeepCleanError("truth ratio: a question has no perturbed answers; expected at least one per question.")
    perturbed = np.array([np.mean(np.asarray(values, np.float64)) for values in perturbed_log_probs])
    return np.exp(perturbed - paraphrased)


def truth_ratio_score(ratios: Sequence[float], forget: bool) -> float:
    """TOFU's reported truth ratio: `mean(min(R, 1/R))` on forget questions (1 when the model cannot tell the true
    answer from wrong ones, as a model that never saw them), `mean(max(0, 1 - R))` on questions to keep (1 when
    wrong answers are far less likely than the true one)."""
    ratios = np.asarray(ratios, np.float64)
    values = np.minimum(ratios, 1.0 / ratios) if forget else np.maximum(0.0, 1.0 - ratios)
    return float(np.mean(values))


def forget_quality(unlearned_ratios: Sequence[float], retrain_ratios: Sequence[float]) -> dict[str, float]:
    """TOFU's forget quality: `ks_2samp(unlearned, retrain).pvalue` on the forget questions' truth ratios.

    High (near 1): the unlearned model's truth ratios are distributed as the retrained model's; TOFU reads
    p > 0.05 as "indistinguishable". (TOFU's code compares `1 / R`; the test is invariant to that monotone map.)

    Returns:
        `{"forget_quality": p-value, "ks_statistic": D}`.
    """
    result = ks_2samp(np.asarray(unlearned_ratios, np.float64), np.asarray(retrain_ratios, np.float64))
    return {"forget_quality": float(result.pvalue), "ks_statistic": float(result.statistic)}


def forget_quality_of_scores(scores: Mapping[str, Sequence], reference_scores: Mapping[str, Sequence]) -> dict:
    """Forget quality of a model against a reference from their `question_scores` on the forget questions:
    `forget_quality` and `ks_statistic` of their truth ratios, and the model's `forget_truth_ratio` (TOFU's score,
    `mean(min(R, 1/R))`)."""
    ratios, reference = (
        truth_ratios(values["paraphrased_log_prob"], values["perturbed_log_probs"])
        for values in (scores, reference_scores)
    )
    return {**forget_quality(ratios, reference), "forget_truth_ratio": truth_ratio_score(ratios, forget=True)}


_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each generated answer against the true one (the `rouge-score` package, with stemming, as
    TOFU computes it)."""
    return np.array([_SCORER.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)])


def answer_probability(answer_log_probs: Sequence[float], perturbed_log_probs=None) -> float:
    """TOFU's probability: mean of `P(a|q)^(1/|a|)`; with `perturbed_log_probs`, each normalised over the true and
    the perturbed answers, `P(a) / (P(a) + sum_i P(a_i))` (TOFU's real-authors and world-facts sets)."""
    true = np.exp(np.asarray(answer_log_probs, np.float64))
    if perturbed_log_probs is None:
        return float(np.mean(true))
    wrong = np.array([np.exp(np.asarray(values, np.float64)).sum() for values in perturbed_log_probs])
    return float(np.mean(true / (true + wrong)))


def utility_numbers(
    answer_log_probs: Sequence[float],
    paraphrased_log_probs: Sequence[float],
    perturbed_log_probs: Sequence[Sequence[float]],
    predictions: Sequence[str],
    references: Sequence[str],
    normalize_probability: bool = False,
) -> dict[str, float]:
    """TOFU's three numbers of one set to keep: `probability` (`answer_probability`, normalised over the answer
    options with `normalize_probability`), `rouge_l_recall` (mean of `rouge_l_recall` of the generated answers) and
    `truth_ratio` (`truth_ratio_score` of a set to keep)."""
    return {
        "probability": answer_probability(answer_log_probs, perturbed_log_probs if normalize_probability else None),
        "rouge_l_recall": float(np.mean(rouge_l_recall(predictions, references))),
        "truth_ratio": truth_ratio_score(truth_ratios(paraphrased_log_probs, perturbed_log_probs), forget=False),
    }


def retain_utility(scores: Mapping[str, Sequence], answers: Sequence[str]) -> dict[str, float]:
    """TOFU's model utility on one set of retain questions (`question_scores` with `generate`, and the true
    answers): `model_utility` and its three numbers `retain_probability` (not normalised over the answer options),
    `retain_rouge_l_recall` and `retain_truth_ratio`."""
    numbers = utility_numbers(
        scores["answer_log_prob"],
        scores["paraphrased_log_prob"],
        scores["perturbed_log_probs"],
        scores["prediction"],
        answers,
    )
    return {
        **{f"retain_{key}": value for key, value in numbers.items()},
        "model_utility": model_utility({"": numbers}),
    }


def model_utility(sets: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of every number in `sets` (`{set: {"probability", "rouge_l_recall", "truth_ratio"}}`); 0
    when one of them is 0."""
    values = np.array([value for numbers in sets.values() for value in numbers.values()], np.float64)
    if not len(values):
        raise DeepCleanError("model utility: no sets given.")
    return 0.0 if np.any(values <= 0) else float(hmean(values))


# --------------------------------------------------------------------------------------------------------------
# MUSE (Shi et al. 2024) and membership scores
# --------------------------------------------------------------------------------------------------------------


def privleak(
    unlearned_scores: Sequence[float],
    retrain_scores: Sequence[float],
    is_member: Sequence[int],
    higher_is_member: bool = False,
) -> dict[str, float]:
    """MUSE's PrivLeak: `(AUC_unlearned - AUC_retrain) / AUC_retrain`.

    Each AUC is that of an attack scoring forget samples (`is_member` 1) against held-out ones (0) with the given
    per-sample scores: a loss-like score (lower = member) by default, a Min-K% / Min-K%++ score with
    `higher_is_member`. 0: the unlearned model leaks as much as the retrained one; positive: it still tells the
    forget set apart (under-unlearning); negative: over-unlearning. MUSE reports it in percent.

    Returns:
        `{"privleak", "auc_unlearned", "auc_retrain"}`.
    """
    member = np.asarray(is_member) == 1
    if member.all() or not member.any():
        raise DeepCleanError("privleak: expected both forget (1) and held-out (0) samples.")
    sign = -1.0 if higher_is_member else 1.0
    aucs = []
    for scores in (unlearned_scores, retrain_scores):
        scores = sign * np.asarray(scores, np.float64)
        aucs.append(membership_inference_auc(scores[member], scores[~member]))
    return {"privleak": (aucs[0] - aucs[1]) / aucs[1], "auc_unlearned": aucs[0], "auc_retrain": aucs[1]}


def privleak_of_outputs(
    outputs: Mapping[str, Mapping[str, np.ndarray]], reference_outputs: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """PrivLeak with MUSE's attack, Min-K% Prob, from the per-sequence outputs (`compute_sequence_outputs`) of a
    model and of the reference on the same `forget` (members) and `test` (held-out) sequences; a sequence without
    predicted tokens has no score and is left out."""
    scores, reference, members = [], [], []
    for split, member in (("forget", 1), ("test", 0)):
        model_split, reference_split = outputs[split]["min_k"], reference_outputs[split]["min_k"]
        kept = np.isfinite(model_split) & np.isfinite(reference_split)
        scores.append(model_split[kept])
        reference.append(reference_split[kept])
        members.append(np.full(int(kept.sum()), member))
    return privleak(np.concatenate(scores), np.concatenate(reference), np.concatenate(members), higher_is_member=True)


def zlib_ratio_scores(losses: Sequence[float], texts: Sequence[str]) -> np.ndarray:
    """zlib ratio per sequence: its mean token loss (log-perplexity) over the byte length of `zlib.compress` of its
    UTF-8 text (Carlini et al. 2021). Lower means "member": a low loss that the text's own redundancy does not
    explain."""
    losses = np.asarray(losses, np.float64)
    if len(losses) != len(texts):
        raise DeepCleanError(f"zlib ratio: got {len(losses)} losses and {len(texts)} texts.")
    lengths = np.array([len(zlib.compress(text.encode("utf-8"))) for text in texts], np.float64)
    return losses / lengths


def min_k_plus_plus_token_scores(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-K%++ token scores: `(log p(x_t | x_<t) - mu_t) / sigma_t`, with `mu_t` and `sigma_t^2` the mean and the
    variance of `log p(z | x_<t)` for `z` drawn from the model's own next-token distribution.

    A position whose distribution is a single token (`sigma_t = 0`) scores 0 (`sigma_t` is floored at 1e-12).

    Returns:
        `(scores, valid)`, shaped like `token_log_likelihoods`' outputs; scores are 0 where not valid.
    """
    picked, valid = token_log_likelihoods(logits, labels, shift)
    log_probs = torch.log_softmax((logits[:, :-1] if shift else logits).float(), dim=-1)
    probs = log_probs.exp()
    mu = (probs * log_probs).sum(-1)
    variance = (probs * log_probs.square()).sum(-1) - mu.square()
    scores = (picked - mu) / variance.clamp(min=0).sqrt().clamp(min=1e-12)
    return scores.masked_fill(~valid, 0.0), valid


def min_k_plus_plus_scores(
    logits: torch.Tensor, labels: torch.Tensor, k: float = MIN_K_FRACTION, shift: bool = True
) -> torch.Tensor:
    """Min-K%++ per sequence: mean of its `max(1, floor(k * tokens))` lowest token scores
    (`min_k_plus_plus_token_scores`), as `min_k_scores` does for Min-K%. Higher means "member"; NaN for a
    sequence without predicted tokens. (The authors' code keeps `int(k * tokens)` tokens, none for a short
    sequence; at least one is kept here.)"""
    scores, valid = min_k_plus_plus_token_scores(logits, labels, shift)
    return min_k_scores(scores, valid, k)
