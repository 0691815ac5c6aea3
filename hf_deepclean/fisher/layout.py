"""Whether a module's calls are laid out one row per sample, so that its rule sees each sample's gradient apart.

Three checks, run by `LayoutMonitor` for the Fisher engine on every micro-batch. The parameters in scope and the
module outputs expanded over the batch are watched tensors for the computation (their class carries a
`__torch_function__`), so that every torch call given one of them during the recorded forward pass is seen, and no
other call pays anything: a parameter used outside a call of a module that owns it is sent to the exact path; a
module output shared by the batch (`[1, ...]`, position embeddings) and expanded over it must only meet per-sample
tensors in elementwise arithmetic, or the micro-batch is redone without expanding it. And when a module's call is
laid out in a way not yet checked for it (`layout_key`: the ranks of its tensors and which of their other axes have
as many rows as the batch), the forward pass is run again on two of the micro-batch's samples, the last and the
first: a module laid out by sample must see those two rows of its recorded call (a sequence-first `[T, N, d]` tensor
with `T == N` fails this). A module once seen not laid out by sample takes the exact path from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

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
    """Sees every torch call of the recorded forward pass, for the parameter check where the parameters in scope
    cannot be watched tensors (a parameter of a class other than `nn.Parameter`: its own behaviour stays)."""

    def __init__(self, monitor: LayoutMonitor):
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.monitor.watching and getattr(func, "__name__", "") not in _METADATA_OPS:
            self.monitor.check_parameters(getattr(func, "__name__", ""), _tensor_args(args, kwargs))
        return func(*args, **kwargs)


# the monitors whose parameters are watched now, innermost last
_MONITORS: list[LayoutMonitor] = []


class _Watched:
    """Watched tensors: their torch calls go to the innermost attached monitor's `dispatch`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _MONITORS:
            return _MONITORS[-1].dispatch(func, types, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _foreign(cls: type) -> bool:
    """Whether tensors of class `cls` have a `__torch_function__` of their own."""
    if cls is torch.Tensor or cls is nn.Parameter or issubclass(cls, _Watched):
        return False
    return cls.__torch_function__ is not torch._C._disabled_torch_function_impl


class WatchedParameter(_Watched, nn.Parameter):
    """A parameter in scope, while the engine is attached."""


class WatchedTensor(_Watched, torch.Tensor):
    """A module output expanded over the batch."""


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


def layout_key(tensors: list[torch.Tensor], n: int) -> tuple:
    """What a module call's layout check covers: each tensor's rank and which of its other axes have `n` entries
    (where one does, the leading axis may be that axis's twin rather than the samples)."""
    return tuple((t.dim(), tuple(i for i, size in enumerate(t.shape) if i and size == n)) for t in tensors)


def probe_rows(n: int) -> list[int]:
    """The samples the layout probe runs on: the last and the first, in that order."""
    return [n - 1, 0]


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    if not before.is_floating_point():
        return torch.equal(before, after)
    scale = float(torch.nan_to_num(before.float(), posinf=0.0, neginf=0.0).abs().max()) if before.numel() else 0
    return torch.allclose(after.float(), before.float(), rtol=1e-3, atol=1e-4 * scale + 1e-30, equal_nan=True)


class LayoutMonitor:
    """The layout checks of one Fisher computation, for the engine that owns it.

    It tracks the modules being called now, the outputs expanded over the batch and how they are used, the calls
    recorded in this micro-batch for the layout probe (`trace`), the layouts each module has passed it with
    (`proven`) and the modules found not laid out by sample (`not_by_sample`). Parameters that fail a check are
    handed to `to_exact(names, reason)`.
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
        self.mode = False  # parameters that cannot be watched tensors: a `Watch` mode sees every call instead
        self.swapped: list[nn.Parameter] = []
        self.expanded: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        self.no_expand: set[nn.Module] = set()
        self.probing = False
        self.probe_calls: dict[nn.Module, int] = {}
        self.trace: dict[nn.Module, list[tuple[tuple, list[torch.Tensor]] | None]] = {}
        self.proven: dict[nn.Module, set[tuple]] = {}
        self.not_by_sample: set[nn.Module] = set()

    # -- the recorded forward pass ----------------------------------------------------------------------------

    @contextmanager
    def watched_parameters(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """While attached: the parameters in scope are watched tensors, or, if one of them has a class of its own,
        a `Watch` mode sees every call of each recorded forward pass."""
        params = list({id(p): p for p in params}.values())
        self.mode = any(type(p) is not nn.Parameter for p in params)
        self.swapped = [] if self.mode else params
        for p in self.swapped:
            p.__class__ = WatchedParameter
        _MONITORS.append(self)
        try:
            yield
        finally:
            _MONITORS.remove(self)
            self._unwatch_parameters()

    def _unwatch_parameters(self) -> None:
        for p in self.swapped:
            p.__class__ = nn.Parameter
        self.swapped = []
        self.mode = True

    def foreign_class_seen(self, args, kwargs) -> None:
        """A tensor of a class of the model's own with a `__torch_function__` (which may see a call before a watched
        parameter's class does) met a watched tensor, or a module call: from now on a `Watch` mode, which comes
        before any class, sees every call, and the parameters keep their own class; an expanded output that met one
        is not expanded again. Raises `Retry`."""
        for tensor in pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and id(tensor) in self.expanded:
                self.no_expand.add(self.expanded[id(tensor)][1])
        self._unwatch_parameters()
        raise Retry

    def check_classes(self, tensors: list[torch.Tensor]) -> None:
        """`foreign_class_seen` where one of a module call's `tensors` has a class of the model's own."""
        if not self.mode and any(_foreign(type(t)) for t in tensors):
            self.foreign_class_seen((), {})

    def watch(self):
        """The context of a recorded forward pass."""
        return Watch(self) if self.mode else nullcontext()

    def enter(self, module: nn.Module) -> None:
        self.active[module] = self.active.get(module, 0) + 1

    def leave(self, module: nn.Module) -> None:
        if self.active.get(module):
            self.active[module] -= 1

    def dispatch(self, func, types, args: tuple, kwargs: dict):
        """A torch call given a watched tensor: run it plainly, after `observe` while recording."""
        if self.watching and any(_foreign(t) for t in types):
            self.foreign_class_seen(args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            if not self.watching:
                return func(*args, **kwargs)
            source = self.observe(func, args, kwargs)
            result = func(*args, **kwargs)
        if source is not None and isinstance(result, torch.Tensor) and id(result) not in self.expanded:
            result = self.mark_expanded(result, source)
        return result

    def mark_expanded(self, tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """`tensor`, an output of `module` expanded over the batch, as a watched tensor."""
        tensor = tensor.as_subclass(WatchedTensor)
        self.expanded[id(tensor)] = (tensor, module)
        return tensor

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
        self.check_parameters(op, tensors)
        source = None
        for tensor in tensors:
            if id(tensor) in self.expanded:
                source = self._check_broadcast_use(op, args, kwargs, tensors, tensor)
        return source

    def check_parameters(self, op: str, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            name = self.param_names.get(id(tensor))
            owners = self.owners.get(name, ()) if name is not None and name not in self.sink.exact else None
            if owners is not None and not any(self.active.get(owner) for owner in owners):
                self.to_exact([name], f"used by `{op}` outside a call of {self.module_names.get(name, '?')}")

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

    # -- the layout probe -------------------------------------------------------------------------------------

    def record(self, module: nn.Module, tensors: list[torch.Tensor] | None) -> None:
        """A call of `module` in the recorded pass, with its input and output `tensors` where its rule takes it
        (`None` where it does not, or the call is expanded over the batch): kept for the layout probe when its
        layout is new for the module."""
        calls = self.trace.setdefault(module, [])
        n = self.sink.batch_size
        key = layout_key(tensors, n) if tensors is not None and n > 1 else None
        if key is None or key in self.proven.get(module, ()):
            calls.append(None)
            return
        rows = probe_rows(n)
        calls.append((key, [t.detach()[rows] if per_sample(t, n) else t.detach().clone() for t in tensors]))

    def probe_call(self, module, args, kwargs, output) -> None:
        index = self.probe_calls.get(module, 0)
        self.probe_calls[module] = index + 1
        recorded = self.trace.get(module)
        if recorded is None or module in self.not_by_sample:
            return
        expected = recorded[index] if index < len(recorded) else None
        if expected is None:
            if index >= len(recorded):
                self.not_by_sample.add(module)  # calls differ between the two runs
            return
        leaves = pytree.tree_leaves(output)
        outputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        current = inputs + outputs
        if len(current) != len(expected[1]) or not all(
            _same(before, after.detach()) for before, after in zip(expected[1], current)
        ):
            self.not_by_sample.add(module)

    def probe(self, batch: Mapping[str, torch.Tensor]) -> None:
        """After a recorded forward pass: probe the module calls it kept, if any, then forget the trace."""
        probed = {module: calls for module, calls in self.trace.items() if any(c is not None for c in calls)}
        if probed:
            with torch.enable_grad():
                self._probe_layouts(batch, probed)
        self.trace.clear()

    def _probe_layouts(self, batch: Mapping[str, torch.Tensor], probed: dict) -> None:
        """Run the forward pass again on two samples, the last and the first: a module laid out by sample sees
        those rows of its recorded calls. Modules that do not go to the exact path from this micro-batch on."""
        n = self.sink.batch_size
        rows = torch.tensor(probe_rows(n))
        self.trace = probed
        self.probing = True
        self.probe_calls.clear()
        try:
            self.model(**{k: v[rows.to(v.device)] if per_sample(v, n) else v for k, v in batch.items()})
        finally:
            self.probing = False
        for module, recorded in probed.items():
            if self.probe_calls.get(module, 0) != len(recorded):
                self.not_by_sample.add(module)
            if module not in self.not_by_sample:
                self.proven.setdefault(module, set()).update(call[0] for call in recorded if call is not None)
            else:
                self.to_exact(self.rules[module].params.values(), f"{self.labels[module]} mixes samples in a row")
