"""hf_deepclean: make trained Hugging Face models forget chosen training data (DeepClean, arXiv 2311.10448)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0.dev0"

# Public names and the modules that define them. They are imported on first use, as transformers does, so that
# light commands (`hf-deepclean push`, `--help`) do not pay for importing torch, datasets and transformers models.
_EXPORTS = {
    "DataArguments": "config",
    "DeepCleanConfig": "config",
    "ModelArguments": "config",
    "OutputArguments": "config",
    "DeepCleanError": "errors",
    "DeepCleanRunError": "errors",
    "FisherDiagonal": "fisher",
    "compute_fisher_diagonal": "fisher",
    "compute_fisher_ratio": "unlearning",
    "reset_selected_weights": "unlearning",
    "select_weights_to_reset": "unlearning",
    "DeepCleanSession": "pipeline.session",
    "DeepCleanUnlearner": "pipeline.unlearn",
    "UnlearningRows": "pipeline.deepclean",
    "evaluate_forgetting": "pipeline.assessment",
    "run_deepclean": "pipeline.deepclean",
    "unlearn": "pipeline.unlearn",
    "UnlearningResults": "records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see; F401: these names are exported through __getattr__
    from .config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments  # noqa: F401
    from .errors import DeepCleanError, DeepCleanRunError  # noqa: F401
    from .fisher import FisherDiagonal, compute_fisher_diagonal  # noqa: F401
    from .pipeline.assessment import evaluate_forgetting  # noqa: F401
    from .pipeline.deepclean import UnlearningRows, run_deepclean  # noqa: F401
    from .pipeline.session import DeepCleanSession  # noqa: F401
    from .pipeline.unlearn import DeepCleanUnlearner, unlearn  # noqa: F401
    from .records import UnlearningResults  # noqa: F401
    from .unlearning import compute_fisher_ratio, reset_selected_weights, select_weights_to_reset  # noqa: F401
