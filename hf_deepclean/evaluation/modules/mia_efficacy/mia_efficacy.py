"""`mia_efficacy`: share of forget samples a retain-vs-held-out attack calls non-members."""

import datasets
import evaluate
import numpy as np

from hf_deepclean.evaluation.metrics import membership_inference_efficacy


_DESCRIPTION = """
A logistic-regression attack on per-sample (loss, entropy, max-prob) features is trained to tell retain samples
(members) from held-out samples (non-members), then applied to the forget set. The result is the share of forget
samples it calls non-members: near 0 when the model still treats them as training data, higher once forgotten.
"""

_KWARGS_DESCRIPTION = """
Args:
    loss (`list` of `float`): per-sample loss.
    entropy (`list` of `float`): per-sample predictive entropy.
    max_prob (`list` of `float`): per-sample largest class probability.
    split (`list` of `str`): `retain`, `test` (held out) or `forget` for each sample.
Returns:
    mia_efficacy (`float`): share of forget samples predicted non-member.
"""

SPLITS = ("retain", "test", "forget")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MiaEfficacy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "loss": datasets.Value("float64"),
                    "entropy": datasets.Value("float64"),
                    "max_prob": datasets.Value("float64"),
                    "split": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, loss, entropy, max_prob, split):
        split = np.asarray(split)
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"split: got {unknown}; expected retain, test or forget.")
        columns = {"loss": np.asarray(loss), "entropy": np.asarray(entropy), "max_prob": np.asarray(max_prob)}
        parts = {name: {key: values[split == name] for key, values in columns.items()} for name in SPLITS}
        for name, part in parts.items():
            if not len(part["loss"]):
                raise ValueError(f"split: no {name!r} samples; the attack needs retain, test and forget samples.")
        return {"mia_efficacy": membership_inference_efficacy(parts["retain"], parts["test"], parts["forget"])}
