"""`mia_auc`: AUC of a loss-threshold membership-inference attack."""

import datasets
import evaluate

from hf_deepclean.evaluation.metrics import membership_inference_auc


_DESCRIPTION = """
AUC of the attack that calls a sample a training member when its loss is low. 0.5: members and non-members are
indistinguishable by loss; 1.0: every member has a lower loss than every non-member; below 0.5: members look
*less* familiar than non-members (as after forgetting a whole class).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): per-sample loss.
    references (`list` of `int`): 1 for a member (e.g. a forget-set sample), 0 for a non-member (held out).
Returns:
    mia_auc (`float`): the attack's ROC AUC.
Examples:
    >>> metric = evaluate.load(metric_path("mia_auc"))
    >>> metric.compute(predictions=[0.01, 0.02, 1.0, 2.0], references=[1, 1, 0, 0])
    {'mia_auc': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MiaAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        members = [loss for loss, member in zip(predictions, references) if member == 1]
        nonmembers = [loss for loss, member in zip(predictions, references) if member == 0]
        return {"mia_auc": membership_inference_auc(members, nonmembers)}
