"""The exact per-sample path: one forward and backward pass of the whole model per sample, for the parameters whose
per-sample gradients no per-layer rule can give (their module's calls are not laid out by sample, they are used
outside a call of their module, or no module call uses them). Their per-sample gradients are then right by
definition, whatever the model does with its batch inside, at the cost of one pass per sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import DeepCleanError
from .accumulator import FisherAccumulator
from .layout import per_sample
from .objectives import sample_objectives


class ExactPath:
    """The exact per-sample path of one Fisher computation: adds to `sink` (`add_exact`), names failing modules by
    `module_names` (`{parameter: module label}`)."""

    def __init__(self, model: nn.Module, sink: FisherAccumulator, module_names: Mapping[str, str]):
        self.model = model
        self.sink = sink
        self.module_names = module_names

    def run(
        self,
        params: Mapping[str, nn.Parameter],
        batch: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        fisher_type: str,
        shift: bool,
    ) -> set[str]:
        """Add the squared per-sample gradients of `params` (`{name: parameter}`, in the order to differentiate them)
        over the `sink.batch_size` samples of `batch` to the sink, `labels` being the batch's (`shift`: see
        `objectives.sample_log_likelihoods`).

        The parameters are switched to `requires_grad=True` for the passes only; the caller keeps its hooks from
        recording meanwhile.

        Returns:
            The names of the parameters that received a gradient from at least one sample.

        Raises:
            DeepCleanError: one line naming the modules, when a pass fails.
        """
        names = list(params)
        tensors = [params[name] for name in names]
        n = self.sink.batch_size
        covered: set[str] = set()
        for p in tensors:
            p.requires_grad_(True)
        try:
            for i in range(n):
                sample = {k: v[i : i + 1] if per_sample(v, n) else v for k, v in batch.items()}
                with torch.enable_grad():
                    logits = self.model(**sample).logits
                    objectives = sample_objectives(logits, labels[i : i + 1], fisher_type, shift)
                    for k, objective in enumerate(objectives):
                        retain = k < len(objectives) - 1
                        grads = torch.autograd.grad(objective, tensors, retain_graph=retain, allow_unused=True)
                        for name, grad in zip(names, grads):
                            if grad is not None:
                                self.sink.add_exact(name, grad)
                                covered.add(name)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            modules = sorted({self.module_names.get(name, name) for name in names})
            raise DeepCleanError(
                f"Fisher: the exact per-sample pass for {', '.join(modules[:3])} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); leave these parameters out of --scope or "
                "register a rule for their module with hf_deepclean.fisher.register_rule."
            ) from error
        finally:
            for p in tensors:
                p.requires_grad_(False)
        return covered
