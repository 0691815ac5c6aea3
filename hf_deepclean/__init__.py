"""hf_deepclean: make trained Hugging Face models forget chosen training data (DeepClean, arXiv 2311.10448)."""

from .config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from .errors import DeepCleanError, DeepCleanRunError
from .fisher import FisherDiagonal, compute_fisher_diagonal
from .reset import compute_fisher_ratio, reset_selected_weights, select_weights_to_reset
from .unlearner import DeepCleanUnlearner


__version__ = "0.1.0.dev0"

__all__ = [
    "DataArguments",
    "DeepCleanConfig",
    "DeepCleanError",
    "DeepCleanRunError",
    "DeepCleanUnlearner",
    "FisherDiagonal",
    "ModelArguments",
    "OutputArguments",
    "compute_fisher_diagonal",
    "compute_fisher_ratio",
    "reset_selected_weights",
    "select_weights_to_reset",
]
