"""Local `evaluate` metric modules for unlearning: load them by path, never from the Hub.

```python
import evaluate
from hf_deepclean.evaluation.modules import metric_path

mia_auc = evaluate.load(metric_path("mia_auc"))
mia_auc.compute(predictions=losses, references=is_member)
```

Each module is a thin `evaluate.Metric` around the functions of `hf_deepclean.evaluation.metrics`, so the numbers are
the ones the CLI reports.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DeepCleanError


METRIC_NAMES = ("mia_auc", "mia_efficacy", "avg_gap")


def metric_path(name: str) -> str:
    """Folder of the local `evaluate` module `name`, to pass to `evaluate.load`.

    Args:
        name: one of `mia_auc`, `mia_efficacy`, `avg_gap`.

    Returns:
        The absolute path of the metric's folder inside the installed package.
    """
    if name not in METRIC_NAMES:
        raise DeepCleanError(f"metric: got {name!r}; expected one of {', '.join(METRIC_NAMES)}.")
    return str(Path(__file__).parent / name)
