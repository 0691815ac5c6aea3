"""How the benchmark measures a causal LM on the facts scenarios: TOFU's and MUSE's figures.

Of each model (`FactsEvaluation.measure`):
- `forget_probability`, `forget_rouge_l`: TOFU's answer probability (mean `P(a|q)^(1/|a|)`) and the ROUGE-L recall
  of the greedy answer on the forget questions (knowledge memorisation);
- `model_utility`: TOFU's harmonic mean of the answer probability, ROUGE-L recall and truth ratio on a seeded sample
  of the retain questions (`retain_*`) and on the real-world facts (`general_*`, with the probability normalised
  over the answer options, as TOFU's world-facts set): six numbers, TOFU's nine less its real-authors set;
- `forget_perplexity`, `retain_perplexity`, `test_perplexity` (held-out people);
- membership attacks telling the forget rows (members) from the held-out people's rows: `mia_auc` (loss),
  `mia_zlib_auc` (zlib ratio), `mia_min_k_auc` (Min-K%), `mia_min_k_plus_plus_auc` (Min-K%++), each an AUC (0.5: no
  better than chance).

Against the retrained model of the same seed and the original (`FactsEvaluation.compare`):
- `forget_quality`: TOFU's KS-test p-value between the truth ratios of the model and of the retrained model on the
  forget questions (with `ks_statistic` and `forget_truth_ratio`, TOFU's `mean(min(R, 1/R))`);
- `privleak`: MUSE's PrivLeak, the Min-K% attack's AUC relative to the retrained model's (0: as the retrained model;
  positive: the forget rows still stand out);
- `utility_share_of_original`: `model_utility` over the original model's.

The definitions are those of `hf_deepclean.evaluation.lm_attacks` and `hf_deepclean.evaluation.causal_lm`, which
the local `evaluate` modules wrap. Under several processes every process scores every question (the scenarios are
small); the sequence passes are sharded and gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn

from ..data.collators import make_dataloader, subsample
from ..evaluation.causal_lm import causal_lm_split_metrics, compute_sequence_outputs, sequence_attack_aucs
from ..evaluation.lm_attacks import (
    answer_probability,
    forget_quality_of_scores,
    is_question_row,
    min_k_plus_plus_scores,
    model_utility,
    privleak_of_outputs,
    question_scores,
    rouge_l_recall,
    utility_numbers,
    zlib_ratio_scores,
)
from ..evaluation.metrics import membership_inference_auc, preserved_random_state


# the retain questions model utility reads (TOFU reads 400 of its 3,600; a seeded sample keeps the benchmark quick)
UTILITY_QUESTIONS = 100
# TOFU's threshold: a forget quality at least this high reads as indistinguishable from retraining
FORGET_QUALITY_THRESHOLD = 0.05


@dataclass
class FactsEvaluation:
    """The rows every model of one facts scenario and seed is measured on, and the per-sample figures measured so
    far (for the comparison with the retrained model).

    Args:
        tokenizer: the scenario's tokenizer.
        collator: its causal-LM collator.
        accelerator: the run's Accelerator.
        sequences: `{"forget", "retain", "test"}` rows whose perplexity (and, for forget and test, membership) is
            measured; `test` are the reported held-out rows.
        questions: `{"forget", "retain", "general"}` question rows (`is_question_row`).
        batch_size: rows per forward pass.
    """

    tokenizer: Any
    collator: Callable
    accelerator: Accelerator
    sequences: dict[str, Dataset]
    questions: dict[str, list[dict]]
    batch_size: int = 64
    samples: dict[str, tuple[dict, dict]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(
        cls,
        tokenizer,
        collator: Callable,
        accelerator: Accelerator,
        forget: Dataset,
        retain: Dataset,
        test: Dataset,
        *,
        seed: int,
        max_eval_samples: int | None = None,
    ) -> FactsEvaluation:
        """The evaluation of a facts scenario: every forget row, seeded samples of at most `max_eval_samples` retain
        and held-out rows, and of at most `UTILITY_QUESTIONS` (and `max_eval_samples`) retain questions about people
        and real-world facts (the retain rows of `person_id` -1)."""
        limit = min(UTILITY_QUESTIONS, max_eval_samples or UTILITY_QUESTIONS)
        questions = {
            "forget": [row for row in forget if is_question_row(row)],
            "retain": _sample([row for row in retain if is_question_row(row) and row["person_id"] >= 0], limit, seed),
            "general": _sample([row for row in retain if is_question_row(row) and row["person_id"] < 0], limit, seed),
        }
        sequences = {
            "forget": forget,
            "retain": subsample(retain, max_eval_samples, seed),
            "test": subsample(test, max_eval_samples, seed),
        }
        return cls(tokenizer, collator, accelerator, sequences, questions)

    @torch.no_grad()
    def measure(self, name: str, model: nn.Module) -> dict[str, float]:
        """The figures of one model (see the module docstring); its per-sample figures are kept under `name`. The
        global random state is left as it was."""
        model = self.accelerator.unwrap_model(model).eval()
        with preserved_random_state(self.accelerator):
            outputs = {
                split: compute_sequence_outputs(
                    model, make_dataloader(rows, self.collator, self.batch_size), self.accelerator, f"{name} {split}"
                )
                for split, rows in self.sequences.items()
            }
            plus_plus = {split: self.min_k_plus_plus(model, self.sequences[split]) for split in ("forget", "test")}
            scores = {
                split: question_scores(model, self.tokenizer, rows, generate=True, batch_size=self.batch_size)
                for split, rows in self.questions.items()
            }
        self.samples[name] = (outputs, scores)
        metrics: dict[str, float] = {}
        for split, values in outputs.items():
            metrics |= causal_lm_split_metrics(split, values)
        metrics |= sequence_attack_aucs(outputs["forget"], outputs["test"])
        metrics |= attack_aucs(outputs, plus_plus, self.sequences)
        forget_answers = [row["answer"] for row in self.questions["forget"]]
        metrics["forget_probability"] = answer_probability(scores["forget"]["answer_log_prob"])
        metrics["forget_rouge_l"] = float(np.mean(rouge_l_recall(scores["forget"]["prediction"], forget_answers)))
        metrics |= utility(scores, self.questions)
        return metrics

    def min_k_plus_plus(self, model: nn.Module, rows: Dataset) -> np.ndarray:
        """Min-K%++ score of every row, in order."""
        device = next(model.parameters()).device
        values = []
        for batch in make_dataloader(rows, self.collator, self.batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            values.append(min_k_plus_plus_scores(model(**batch).logits, labels).cpu())
        return torch.cat(values).double().numpy()

    def compare(self, runs: Sequence[dict[str, Any]], reference: str = "retrain", original: str = "original") -> None:
        """Add `forget_quality`, `ks_statistic`, `forget_truth_ratio`, `privleak` and `utility_share_of_original`
        to the metrics of every run measured here, against the `reference` and `original` runs."""
        reference_outputs, reference_scores = self.samples[reference]
        original_utility = next(run for run in runs if run["method"] == original)["metrics"]["model_utility"]
        for run in runs:
            outputs, scores = self.samples[run["method"]]
            metrics = run["metrics"]
            metrics |= forget_quality_of_scores(scores["forget"], reference_scores["forget"])
            metrics["privleak"] = privleak_of_outputs(outputs, reference_outputs)["privleak"]
            share = metrics["model_utility"] / original_utility if original_utility else float("nan")
            metrics["utility_share_of_original"] = share


def _sample(rows: list[dict], count: int, seed: int) -> list[dict]:
    """A seeded sample of at most `count` of `rows`, in their order."""
    order = np.random.default_rng(seed).permutation(len(rows))[:count]
    return [rows[i] for i in sorted(order.tolist())]


def attack_aucs(
    outputs: Mapping[str, Mapping[str, np.ndarray]], plus_plus: Mapping[str, np.ndarray], rows: Mapping[str, Dataset]
) -> dict[str, float]:
    """`mia_zlib_auc` and `mia_min_k_plus_plus_auc` of forget (members) against test rows; the loss and Min-K%
    attacks are `sequence_attack_aucs`'."""
    zlib = {split: zlib_ratio_scores(outputs[split]["loss"], rows[split]["text"]) for split in ("forget", "test")}
    return {
        "mia_zlib_auc": membership_inference_auc(zlib["forget"], zlib["test"]),
        # higher Min-K%++ means "member"; the AUC helper calls a lower value "member"
        "mia_min_k_plus_plus_auc": membership_inference_auc(-plus_plus["forget"], -plus_plus["test"]),
    }


def utility(scores: Mapping[str, Mapping[str, list]], questions: Mapping[str, list[dict]]) -> dict[str, float]:
    """TOFU's model utility over the retain questions and the real-world facts, with its six numbers."""
    sets = {
        split: utility_numbers(
            scores[split]["answer_log_prob"],
            scores[split]["paraphrased_log_prob"],
            scores[split]["perturbed_log_probs"],
            scores[split]["prediction"],
            [row["answer"] for row in questions[split]],
            normalize_probability=split == "general",
        )
        for split in ("retain", "general")
    }
    numbers = {f"{split}_{key}": value for split, values in sets.items() for key, value in values.items()}
    return {"model_utility": model_utility(sets), **numbers}
