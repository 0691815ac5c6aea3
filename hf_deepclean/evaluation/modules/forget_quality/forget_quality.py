"""`forget_quality`: TOFU's forget quality, a KS-test p-value between unlearned and retrained truth ratios."""

import datasets
import evaluate

from hf_deepclean.evaluation.lm_attacks import forget_quality


_CITATION = """
@article{maini2024tofu,
  title={TOFU: A Task of Fictitious Unlearning for LLMs},
  author={Maini, Pratyush and Feng, Zhili and Schwarzschild, Avi and Lipton, Zachary C. and Kolter, J. Zico},
  journal={arXiv preprint arXiv:2401.06121},
  year={2024}
}
"""

_DESCRIPTION = """
Forget quality of TOFU (Maini et al. 2024): the p-value of the two-sample Kolmogorov-Smirnov test
(scipy.stats.ks_2samp, two-sided) between the truth ratios of the unlearned model and those of a model retrained
without the forget set, both on the forget questions. Near 1: the two distributions cannot be told apart; TOFU
reads p > 0.05 as forgetting that matches retraining. The test is unchanged by a monotone map of both samples, so R
and TOFU code's 1/R give the same p-value. Source: https://arxiv.org/abs/2401.06121 and `aggregate_eval_stat.py`
of github.com/locuslab/tofu.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): truth ratio R of the unlearned model on each forget question (`truth_ratio`'s
        `ratios`).
    references (`list` of `float`): truth ratio of the retrained model on the same questions.
Returns:
    forget_quality (`float`): the KS test's p-value; ks_statistic (`float`): its statistic D.
Examples:
    >>> metric = evaluate.load(metric_path("forget_quality"))
    >>> metric.compute(predictions=[0.1, 0.2, 0.3], references=[0.4, 0.5, 0.6])
    {'forget_quality': 0.09999999999999999, 'ks_statistic': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForgetQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        return forget_quality(predictions, references)
