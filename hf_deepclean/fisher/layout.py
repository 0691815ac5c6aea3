"""Whether a module's calls are laid out one row per sample, so that its rule sees each sample's gradient apart.

Three checks, run by `LayoutMonitor` for the Fisher engine: every torch call of the recorded forward pass is watched
(a `TorchFunctionMode`), so that a parameter in scope used outside a call of a module that owns it is sent to the exact
path; a module output shared by the batch (`[1, ...]`, position embeddings) and expanded over it must only meet
per-sample tensors in elementwise arithmetic, or the micro-batch is redone without expanding it; and on the first
micro-batch that calls a module, the forward pass is run again with the samples in reverse order, where a module laid
out by sample must see the same rows reversed (a sequence-first `[T, N, d]` tensor with `T == N` fails this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .accumulator import FisherAccumulator
from .rules import Rule


class Retry(Exception):
    """The micro-batch must be redone (a saved input changed in place, a parameter turned out shared, or an output
    expanded over the batch was used other than by broadcasting)."""


# What an output expanded over the batch may meet: elementwise arithmetic with a per-sample tensor of the same rank,
# so that row n of the result, and the gradient that row n of the expansion receives, are sample n's.
_BROADCAST_OPS = frozenset(
    {
        *("add", "add_", "__add__", "__radd__", "__iadd__"),
        *("sub", "sub_", "__sub__", "__rsub__", "__isub__"),
        *("mul", "mul_", "__mul__", "__rmul__", "__imul__"),
    }
)
# Calls that return an expanded output unchanged in value (a copy, a cast, eval-mode dropout): the result is
# checked in its turn.
_PASS_THROUGH_OPS = frozenset({"to", "type_as", "contiguous", "clone", "float", "half", "bfloat16", "dropout"})
# Reading a tensor's metadata does not use its values.
_METADATA_OPS = frozenset(
    {"__get__", "size", "dim", "numel", "nelement", "ndimension", "element_size", "stride", "storage_offset"}
    | {"is_contiguous", "is_floating_point", "is_complex", "data_ptr", "get_device", "__len__", "__hash__"}
)


class Watch(TorchFunctionMode):
    """Sees every torch call of the recorded forward pass, for `LayoutMonitor.observe`."""

    def __init__(self, monitor: LayoutMonitor):
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.monitor.watching:
            return func(*args, **kwargs)
        source = self.monitor.observe(func, args, kwargs)
        result = func(*args, **kwargs)
        if source is not None and isinstance(result, torch.Tensor):
            self.monitor.expanded[id(result)] = (result, source)
        return result


def _tensor_args(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def per_sample(value, n: int) -> bool:
    """Whether `value` is a tensor with `n` leading rows, one per sample of the batch."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n


def _reversed_copy(expected: list[torch.Tensor], current: list[torch.Tensor], n: int) -> bool:
    """Whether `current` (a call on the samples in reverse order) holds `expected`'s rows reversed, where `expected`
    has `n` leading rows, and `expected` itself elsewhere."""
    if len(expected) != len(current):
        return False
    order = torch.arange(n - 1, -1, -1)
    for before, after in zip(expected, current):
        if before.shape != after.shape or before.dtype != after.dtype:
            return False
        if before.dim() > 0 and before.shape[0] == n:
            before = before[order.to(before.device)]
        if not before.is_floating_point():
            if not torch.equal(before, after):
                return False
            continue
        scale = float(torch.nan_to_num(before.float(), posinf=0.0, neginf=0.0).abs().max()) if before.numel() else 0
        if not torch.allclose(after.float(), before.float(), rtol=1e-3, atol=1e-4 * scale + 1e-30, equal_nan=True):
            return False
    return True


class LayoutMonitor:
    """The layout checks of one Fisher computation, for the engine that owns it.

    It tracks the modules being called now, the outputs expanded over the batch and how they are used, the calls
    recorded on each module's first micro-batch (`trace`) and, after the reverse-order probe, the modules found not
    laid out by sample (`not_by_sample`). Parameters that fail a check are handed to `to_exact(names, reason)`.
    """

    def __init__(
        self,
        model: nn.Module,
        sink: FisherAccumulator,
        rules: Mapping[nn.Module, Rule],
        labels: Mapping[nn.Module, str],
        param_names: Mapping[int, str],
        owners: Mapping[str, list[nn.Module]],
        module_names: Mapping[str, str],
        to_exact: Callable[[Iterable[str], str], None],
    ):
        self.model = model
        self.sink = sink
        self.rules = rules
        self.labels = labels
        self.param_names = param_names
        self.owners = owners
        self.module_names = module_names
        self.to_exact = to_exact
        self.active: dict[nn.Module, int] = {}
        self.watching = False
        self.expanded: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        self.no_expand: set[nn.Module] = set()
        self.probing = False
        self.probe_calls: dict[nn.Module, int] = {}
        self.trace: dict[nn.Module, list[list[torch.Tensor] | None]] = {}
        self.probed: set[nn.Module] = set()
        self.not_by_sample: set[nn.Module] = set()

    # -- the recorded forward pass ----------------------------------------------------------------------------

    def enter(self, module: nn.Module) -> None:
        self.active[module] = self.active.get(module, 0) + 1

    def leave(self, module: nn.Module) -> None:
        if self.active.get(module):
            self.active[module] -= 1

    def trace_for(self, module: nn.Module) -> list[list[torch.Tensor] | None] | None:
        """Where to record the calls of `module` for the reverse-order probe, `None` once it has been probed."""
        return self.trace.setdefault(module, []) if module not in self.probed else None

    def observe(self, func, args: tuple, kwargs: dict) -> nn.Module | None:
        """One torch call of the recorded forward pass: a parameter in scope used outside a call of a module that
        owns it (no rule sees that use) goes to the exact path; an expanded output used other than by broadcasting
        arithmetic is not expanded again (`Retry`).

        Returns:
            The module whose expanded output this call passes through unchanged in value (its result is to be
            watched in turn), else `None`.
        """
        op = getattr(func, "__name__", "")
        if op in _METADATA_OPS:
            return None
        tensors = _tensor_args(args, kwargs)
        source = None
        for tensor in tensors:
            name = self.param_names.get(id(tensor))
            owners = self.owners.get(name, ()) if name is not None and name not in self.sink.exact else None
            if owners is not None and not any(self.active.get(owner) for owner in owners):
                self.to_exact([name], f"used by `{op}` outside a call of {self.module_names.get(name, '?')}")
            if id(tensor) in self.expanded:
                source = self._check_broadcast_use(op, args, kwargs, tensors, tensor)
        return source

    def _check_broadcast_use(
        self, op: str, args: tuple, kwargs: dict, tensors: list[torch.Tensor], expanded: torch.Tensor
    ) -> nn.Module | None:
        module = self.expanded[id(expanded)][1]
        others = [t for t in tensors if t is not expanded]
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if op in _PASS_THROUGH_OPS and not others and (op != "dropout" or training is False):
            return module
        in_place = op.endswith("_") and not op.startswith("__") or op.startswith("__i")
        allowed = (
            op in _BROADCAST_OPS
            and len(tensors) == 2
            and len(others) == 1
            and others[0].dim() == expanded.dim()
            and others[0].shape[0] == self.sink.batch_size
            and not (in_place and args and args[0] is expanded)
        )
        if not allowed:
            self.no_expand.add(module)
            raise Retry
        return None

    # -- the reverse-order probe ------------------------------------------------------------------------------

    def probe_call(self, module, args, kwargs, output) -> None:
        index = self.probe_calls.get(module, 0)
        self.probe_calls[module] = index + 1
        recorded = self.trace.get(module)
        if recorded is None:
            return
        expected = recorded[index] if index < len(recorded) else None
        if expected is None:
            if index >= len(recorded):
                self.not_by_sample.add(module)  # calls differ between the two orders
            return
        leaves = pytree.tree_leaves(output)
        outputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not _reversed_copy(expected, [t.detach() for t in inputs + outputs], self.sink.batch_size):
            self.not_by_sample.add(module)

    def probe(self, batch: Mapping[str, torch.Tensor]) -> None:
        """After a recorded forward pass: probe the modules it traced, if any and if the batch has several samples,
        then forget the trace."""
        if self.sink.batch_size > 1 and any(entry is not None for calls in self.trace.values() for entry in calls):
            with torch.enable_grad():
                self._probe_layouts(batch)
        self.trace.clear()

    def _probe_layouts(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Run the forward pass again with the samples in reverse order: a module laid out by sample sees the same
        rows, reversed. Modules that do not go to the exact path from this micro-batch on."""
        n = self.sink.batch_size
        order = torch.arange(n - 1, -1, -1)
        reversed_batch = {k: v[order.to(v.device)] if per_sample(v, n) else v for k, v in batch.items()}
        self.probing = True
        self.probe_calls.clear()
        try:
            self.model(**reversed_batch)
        finally:
            self.probing = False
        for module, recorded in self.trace.items():
            if self.probe_calls.get(module, 0) != len(recorded):
                self.not_by_sample.add(module)
            if module in self.not_by_sample:
                self.to_exact(self.rules[module].params.values(), f"{self.labels[module]} mixes samples in a row")
        self.probed |= set(self.trace)
        self.trace.clear()
