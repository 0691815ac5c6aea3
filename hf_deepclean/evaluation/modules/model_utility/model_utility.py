"""`model_utility`: TOFU's model utility, a harmonic mean of probability, ROUGE-L recall and truth ratio."""

from collections import defaultdict

import datasets
import evaluate

from hf_deepclean.evaluation.lm_attacks import model_utility, utility_numbers


_CITATION = """
@article{maini2024tofu,
  title={TOFU: A Task of Fictitious Unlearning for LLMs},
  author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
  journal={arXiv preprint arXiv:2401.06121},
  year={2024}
}
"""

_DESCRIPTION = """
Model utility of TOFU (Maini et al. 2024): the harmonic mean of three numbers on each set of
questions the model must keep answering (TOFU: retain, real authors, world facts; 9 numbers):
- probability: mean over questions of P(a|q)^(1/|a|), the length-normalised probability of the true answer; on the
  sets not in `raw_probability_sets` (TOFU: real authors, world facts) normalised over the answer options,
  P(a|q)^(1/|a|) / (P(a|q)^(1/|a|) + sum_i P(a_i|q)^(1/|a_i|)) with the perturbed answers a_i;
- ROUGE-L recall of the model's generated (greedy) answer against the true answer, averaged over questions
  (the `rouge-score` package, with stemming, as TOFU's code);
- truth ratio: mean over questions of max(0, 1 - R), R as in `truth_ratio`.
A single zero makes the harmonic mean 0. Source: https://arxiv.org/abs/2401.06121 and `aggregate_eval_stat.py` and
`evaluate_util.py` of github.com/locuslab/tofu.
"""

_KWARGS_DESCRIPTION = """
Args:
    split (`list` of `str`): the set of each question (e.g. `retain`, `general`).
    answer_log_prob (`list` of `float`): mean log-probability per token of the true answer given the question.
    paraphrased_log_prob (`list` of `float`): the same for the paraphrased answer (the true one if there is none).
    perturbed_log_probs (`list` of `list` of `float`): the same for each perturbed (wrong) answer.
    prediction (`list` of `str`): the model's generated answer.
    reference (`list` of `str`): the true answer.
    raw_probability_sets (`tuple` of `str`, default `("retain",)`): sets whose probability is not normalised over
        the answer options.
Returns:
    model_utility (`float`), and `{set}_probability`, `{set}_rouge_l_recall`, `{set}_truth_ratio` for every set.
Examples:
    >>> metric = evaluate.load(metric_path("model_utility"))
    >>> import math
    >>> metric.compute(split=["retain"], answer_log_prob=[math.log(0.5)], paraphrased_log_prob=[math.log(0.5)],
    ...                perturbed_log_probs=[[math.log(0.25)]], prediction=["Paris"], reference=["Paris"])
    {'retain_probability': 0.5, 'retain_rouge_l_recall': 1.0, 'retain_truth_ratio': 0.5, 'model_utility': 0.6}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ModelUtility(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "split": datasets.Value("string"),
                    "answer_log_prob": datasets.Value("float64"),
                    "paraphrased_log_prob": datasets.Value("float64"),
                    "perturbed_log_probs": datasets.Sequence(datasets.Value("float64")),
                    "prediction": datasets.Value("string"),
                    "reference": datasets.Value("string"),
                }
            ),
        )

    def _compute(
        self,
        split,
        answer_log_prob,
        paraphrased_log_prob,
        perturbed_log_probs,
        prediction,
        reference,
        raw_probability_sets=("retain",),
    ):
        rows = defaultdict(list)
        for i, name in enumerate(split):
            rows[name].append(i)
        sets = {}
        for name, index in rows.items():
            sets[name] = utility_numbers(
                [answer_log_prob[i] for i in index],
                [paraphrased_log_prob[i] for i in index],
                [perturbed_log_probs[i] for i in index],
                [prediction[i] for i in index],
                [reference[i] for i in index],
                normalize_probability=name not in raw_probability_sets,
            )
        result = {f"{name}_{key}": value for name, numbers in sets.items() for key, value in numbers.items()}
        result["model_utility"] = model_utility(sets)
        return result
