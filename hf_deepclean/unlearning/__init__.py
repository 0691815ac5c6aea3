"""DeepClean's steps on tensors: select the weights to reset, reset them, repair them with a masked training."""

from .repair import RepairMonitor, build_repair_monitor, repair_selected_weights
from .reset import ResetMasks, reset_selected_weights
from .selection import compute_fisher_ratio, reset_statistics, select_weights_to_reset


__all__ = [
    "RepairMonitor",
    "ResetMasks",
    "build_repair_monitor",
    "compute_fisher_ratio",
    "repair_selected_weights",
    "reset_selected_weights",
    "reset_statistics",
    "select_weights_to_reset",
]
