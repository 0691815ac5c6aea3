"""`privleak`: MUSE's PrivLeak, a membership attack's AUC relative to the retrained model's."""

import datasets
import evaluate

from hf_deepclean.evaluation.lm_attacks import privleak


_CITATION = """
@article{shi2024muse,
  title={MUSE: Machine Unlearning Six-Way Evaluation for Language Models},
  author={Shi, Weijia and Lee, Jaechan and Huang, Yangsibo and Malladi, Sadhika and Zhao, Jieyu and Holtzman, Ari
    and Liu, Daogao and Zettlemoyer, Luke and Smith, Noah A. and Zhang, Chiyuan},
  journal={arXiv preprint arXiv:2407.06460},
  year={2024}
}
"""

_DESCRIPTION = """
PrivLeak of MUSE (Shi et al. 2024): (AUC_unlearned - AUC_retrain) / AUC_retrain, where each AUC is that
of a membership attack telling forget samples (members) from held-out samples of the same distribution, run on the
unlearned model and on a model retrained without the forget set. 0: the unlearned model leaks what the retrained
one does; positive: the forget set still stands out (under-unlearning); negative: it stands out by being *less*
familiar (over-unlearning). MUSE uses Min-K% Prob as the attack and reports PrivLeak in percent; here it is a
fraction, and any per-sample score can be given (a loss, lower = member, by default; `higher_is_member=True` for
Min-K% / Min-K%++ scores). Source: https://arxiv.org/abs/2407.06460.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): the unlearned model's attack score of each sample.
    retrain_predictions (`list` of `float`): the retrained model's score of the same sample.
    references (`list` of `int`): 1 for a forget sample (member), 0 for a held-out one.
    higher_is_member (`bool`, default False): a higher score means "member" (Min-K%); else a lower one (loss).
Returns:
    privleak (`float`), auc_unlearned (`float`), auc_retrain (`float`).
Examples:
    >>> metric = evaluate.load(metric_path("privleak"))
    >>> metric.compute(predictions=[0.1, 0.2, 1.0, 2.0], retrain_predictions=[0.1, 1.0, 0.2, 2.0],
    ...                references=[1, 1, 0, 0])
    {'privleak': 0.3333333333333333, 'auc_unlearned': 1.0, 'auc_retrain': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Privleak(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "retrain_predictions": datasets.Value("float64"),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, retrain_predictions, references, higher_is_member=False):
        return privleak(predictions, retrain_predictions, references, higher_is_member)
