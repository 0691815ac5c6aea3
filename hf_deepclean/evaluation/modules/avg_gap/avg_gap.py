"""`avg_gap`: distance of a cleaned model to a reference (retrained) model, in percentage points."""

import datasets
import evaluate

from hf_deepclean.evaluation.metrics import compare_to_reference, gap_closed


_DESCRIPTION = """
Mean absolute difference, in percentage points, of forget/retain/test accuracy and mia_efficacy between a model
and a reference model retrained without the forget set; also the signed difference of every metric given.
With `original_avg_gap` (the avg_gap of the model before unlearning), also `gap_closed` = 1 - avg_gap / original.
"""

_KWARGS_DESCRIPTION = """
Args:
    metric (`list` of `str`): metric names, e.g. `forget_accuracy`.
    value (`list` of `float`): the model's value of each metric.
    reference (`list` of `float`): the reference model's value of each metric.
    original_avg_gap (`float`, optional): avg_gap of the original model, for `gap_closed`.
Returns:
    avg_gap (`float`), `{metric}_diff` (`float`) for every metric, and `gap_closed` when `original_avg_gap` is given.
Examples:
    >>> metric = evaluate.load(metric_path("avg_gap"))
    >>> metric.compute(metric=["forget_accuracy", "test_accuracy"], value=[0.5, 0.9], reference=[0.0, 0.9])
    {'forget_accuracy_diff': 0.5, 'test_accuracy_diff': 0.0, 'avg_gap': 25.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AvgGap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "metric": datasets.Value("string"),
                    "value": datasets.Value("float64"),
                    "reference": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, metric, value, reference, original_avg_gap=None):
        result = compare_to_reference(dict(zip(metric, value)), dict(zip(metric, reference)))
        if original_avg_gap is not None and "avg_gap" in result:
            result["gap_closed"] = gap_closed(result["avg_gap"], original_avg_gap)
        return result
