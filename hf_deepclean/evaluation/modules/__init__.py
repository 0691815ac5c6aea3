"""Local `evaluate` metric modules for unlearning: load them by path, never from the Hub.

```python
import evaluate
from hf_deepclean.evaluation.modules import metric_path

mia_auc = evaluate.load(metric_path("mia_auc"))
mia_auc.compute(predictions=losses, references=is_member)
```

Each module is a thin `evaluate.Metric` around the functions of `hf_deepclean.evaluation.metrics` (classifier
metrics, so the numbers are the ones the CLI reports) or of `hf_deepclean.evaluation.lm_attacks` (the TOFU and MUSE
metrics of language models: `truth_ratio`, `forget_quality`, `model_utility`, `privleak`), computed from
per-sample quantities the caller provides (log-probabilities, attack scores, generated answers), no model needed.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DeepCleanError


METRIC_NAMES = ("mia_auc", "mia_efficacy", "avg_gap", "truth_ratio", "forget_quality", "model_utility", "privleak")


def metric_path(name: str) -> str:
    """Folder of the local `evaluate` module `name`, to pass to `evaluate.load`.

    Args:
        name: one of `METRIC_NAMES`.

    Returns:
        The absolute path of the metric's folder inside the installed package.
    """
    if name not in METRIC_NAMES:
        raise DeepCleanError(f"metric: got {name!r}; expected one of {', '.join(METRIC_NAMES)}.")
    return str(Path(__file__).parent / name)
