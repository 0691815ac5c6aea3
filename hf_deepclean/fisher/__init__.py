"""Diagonal Fisher information per sample: rules per module type, their accumulator, the engine, the cache."""

from .check import FisherCheck, check_fisher_engine
from .engine import (
    DEFAULT_CHUNK_MEMORY_MB,
    FISHER_TYPES,
    FisherDiagonal,
    FisherReport,
    accumulate_fisher_sums,
    accumulator_bytes,
    compute_fisher_diagonal,
    fisher_from_sums,
)
from .rules import RULES, ExactPathRule, Rule, register_rule


__all__ = [
    "DEFAULT_CHUNK_MEMORY_MB",
    "FISHER_TYPES",
    "RULES",
    "ExactPathRule",
    "FisherCheck",
    "FisherDiagonal",
    "FisherReport",
    "Rule",
    "accumulate_fisher_sums",
    "accumulator_bytes",
    "check_fisher_engine",
    "compute_fisher_diagonal",
    "fisher_from_sums",
    "register_rule",
]
