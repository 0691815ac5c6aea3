"""The run: load a session once, then unlearn, compute Fisher sums, or evaluate."""

from .unlearn import DeepCleanUnlearner


__all__ = ["DeepCleanUnlearner"]
