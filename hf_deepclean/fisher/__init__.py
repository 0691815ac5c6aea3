"""Diagonal Fisher information per sample: rules per module type, their accumulator, the engine, the cache."""

from .engine import (
    DEFAULT_CHUNK_MEMORY_MB,
    FISHER_TYPES,
    FisherDiagonal,
    accumulate_fisher_sums,
    accumulator_bytes,
    compute_fisher_diagonal,
    fisher_from_sums,
)
from .rules import RULES, Rule, register_rule


__all__ = [
    "DEFAULT_CHUNK_MEMORY_MB",
    "FISHER_TYPES",
    "RULES",
    "FisherDiagonal",
    "Rule",
    "accumulate_fisher_sums",
    "accumulator_bytes",
    "compute_fisher_diagonal",
    "fisher_from_sums",
    "register_rule",
]
