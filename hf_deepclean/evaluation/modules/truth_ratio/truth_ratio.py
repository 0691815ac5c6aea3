"""`truth_ratio`: TOFU's truth ratio, from the log-probabilities of paraphrased and perturbed answers."""

import datasets
import evaluate

from hf_deepclean.evaluation.lm_attacks import truth_ratio_score, truth_ratios


_CITATION = """
@article{maini2024tofu,
  title={TOFU: A Task of Fictitious Unlearning for LLMs},
  author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
  journal={arXiv preprint arXiv:2401.06121},
  year={2024}
}
"""

_DESCRIPTION = """
Truth ratio of TOFU (Maini et al. 2024), per question:
R = (prod_i P(a_i|q)^(1/|a_i|))^(1/n) / P(a~|q)^(1/|a~|) = exp(mean_i lp(a_i) - lp(a~)),
the geometric mean of the length-normalised probabilities of the n perturbed (wrong) answers a_i over that of the
paraphrased answer a~ (lp: mean log-probability per answer token, given the question). The reported score is
TOFU's: mean(min(R, 1/R)) on forget questions (`forget=True`; 1 when the model cannot tell right from wrong, as a
model that never saw the facts), mean(max(0, 1 - R)) on questions to keep (1 when wrong answers are far less
likely than the true one). Source: https://arxiv.org/abs/2401.06121 and its code, `aggregate_eval_stat.py` of
github.com/locuslab/tofu.
"""

_KWARGS_DESCRIPTION = """
Args:
    paraphrased_log_prob (`list` of `float`): mean log-probability per token of each question's paraphrased (or
        true) answer.
    perturbed_log_probs (`list` of `list` of `float`): the same for each question's perturbed answers (at least one).
    forget (`bool`, default False): the questions are forget questions (changes the reported score, see above).
Returns:
    truth_ratio (`float`): TOFU's score; truth_ratio_mean (`float`): the mean of R; ratios (`list` of `float`): R
    per question (what `forget_quality` compares).
Examples:
    >>> metric = evaluate.load(metric_path("truth_ratio"))
    >>> import math
    >>> metric.compute(paraphrased_log_prob=[math.log(0.5)], perturbed_log_probs=[[math.log(0.25)]])
    {'truth_ratio': 0.5, 'truth_ratio_mean': 0.5, 'ratios': [0.5]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TruthRatio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "paraphrased_log_prob": datasets.Value("float64"),
                    "perturbed_log_probs": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, paraphrased_log_prob, perturbed_log_probs, forget=False):
        ratios = truth_ratios(paraphrased_log_prob, perturbed_log_probs)
        return {
            "truth_ratio": truth_ratio_score(ratios, forget),
            "truth_ratio_mean": float(ratios.mean()),
            "ratios": ratios.tolist(),
        }
