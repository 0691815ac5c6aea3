"""Per-sample gradient rules, one per layer type: how a layer's squared per-sample gradients follow from its
inputs and output gradients. The registry matches exact types only; any other layer takes the exact path."""

from __future__ import annotations

from .accumulator import FisherAccumulator


try:  # GPT-2 style layers: a Linear whose weight is stored transposed, `[in, out]`
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree


def chunks(total: int, per_sample_bytes: int, budget_bytes: int) -> Iterator[slice]:
    size = max(1, budget_bytes // max(per_sample_bytes, 1))
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


@dataclass
class ModuleCall:
    """One call of a hooked module: what its rule needs from the forward pass."""

    inputs: tuple
    kwargs: dict
    rule: Rule | None = None
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class Rule:
    """Computes squared per-sample gradients of one module's own parameters in scope."""

    def __init__(self, module: nn.Module, params: dict[str, str], sink: FisherAccumulator, budget_bytes: int):
        self.module = module
        self.params = params  # local attribute name -> scope name
        self.sink = sink
        self.budget_bytes = budget_bytes

    # fewest dimensions of the first input for which the rule knows the layout (`[N, ...]`, a sample axis first)
    min_input_dim = 2

    @classmethod
    def applies(cls, module: nn.Module, local_names: set[str]) -> bool:
        """Whether this rule is exact for `module` as configured (its own parameters in scope: `local_names`)."""
        return True

    def accepts(self, use: ModuleCall, outputs: list[torch.Tensor], n: int) -> bool:
        """Whether this call is laid out by sample: its input and every output it differentiates have `n` rows on
        their leading axis, one per sample of the batch. Anything else (tokens flattened to `[N*T, d]`, tokens
        dispatched to experts, a sequence-first layout) goes to the engine's exact per-sample path."""
        x = _first_input(use)
        if not isinstance(x, torch.Tensor) or x.dim() < self.min_input_dim or x.shape[0] != n:
            return False
        return all(t.dim() > 0 and t.shape[0] == n for t in outputs)

    def backward(self, use: ModuleCall, grad_outputs: list[torch.Tensor | None]) -> None:
        raise NotImplementedError


# samples per length bucket when trailing padding is cut from per-sample products
_BUCKET = 8


def _per_sample_linear(
    sink: FisherAccumulator, name: str, a: torch.Tensor, g: torch.Tensor, budget: int, transpose: bool
):
    """Weight of `y = a W^T` (`[out, in]`, or `[in, out]` when `transpose`) from `a` `[N, T, in]`, `g` `[N, T, out]`.

    Per sample, `sum_t g_t a_tᵀ` is one matrix product. With padded sequences, samples are sorted by length and
    multiplied in buckets cut to their longest member, so trailing padding costs nothing.
    """
    n, length, d_in = a.shape
    d_out = g.shape[-1]
    if length == 1 and name not in sink.shared:
        # no sequence axis: sum_n (g_n a_nᵀ)² = (g²)ᵀ (a²), one matrix product (BackPACK's SumGradSquared)
        squares = g[:, 0].square().T @ a[:, 0].square()
        sink.add_squares(name, squares.T if transpose else squares)
        return

    def product(a_part, g_part):
        return torch.bmm(a_part.transpose(1, 2), g_part) if transpose else torch.bmm(g_part.transpose(1, 2), a_part)

    per_sample_bytes = 4 * d_in * d_out
    if sink.lengths is None or length != sink.padded_length or not _zero_beyond(g, sink.lengths):
        for chunk in chunks(n, per_sample_bytes, budget):
            sink.add_per_sample(name, product(a[chunk], g[chunk]), chunk.start)
        return
    order = torch.argsort(sink.lengths, descending=True)
    size = max(1, min(_BUCKET, budget // per_sample_bytes))
    for start in range(0, n, size):
        samples = order[start : start + size]
        cut = int(sink.lengths[samples[0]])
        sink.add_per_sample(name, product(a[samples, :cut], g[samples, :cut]), samples)


def _zero_beyond(g: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether `g` `[N, T, ...]` is exactly zero at every position past each sample's length (and some sample is
    shorter than `T`): only then can trailing padding be cut from per-sample products without changing them."""
    padding = torch.arange(g.shape[1], device=g.device)[None, :] >= lengths.to(g.device)[:, None]
    return bool(padding.any()) and not bool(g[padding].any())


class LinearRule(Rule):
    transpose = False

    def backward(self, use, grad_outputs):
        (g,) = grad_outputs
        a = _first_input(use).float()
        n = a.shape[0]
        a = a.reshape(n, -1, a.shape[-1])
        g = g.float().reshape(n, -1, g.shape[-1])
        if "weight" in self.params:
            _per_sample_linear(self.sink, self.params["weight"], a, g, self.budget_bytes, self.transpose)
        if "bias" in self.params:
            self.sink.add_per_sample(self.params["bias"], g.sum(1), 0)


class Conv1DRule(LinearRule):
    transpose = True


class EmbeddingRule(Rule):
    min_input_dim = 2  # token ids `[N, T]`: a 1-d `[T]` could be read as samples only by coincidence of sizes

    @classmethod
    def applies(cls, module, local_names):
        return module.max_norm is None  # `max_norm` renormalises rows in the forward pass

    def _tokens(self, use: ModuleCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(ids [N, L], keep [N, L], sample [N, L])`: the positions that carry gradient to the weight."""
        ids = _first_input(use)
        n = ids.shape[0]
        ids = ids.reshape(n, -1)
        sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.module.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            keep = ids != self.module.padding_idx
        # padded positions are kept: where their output gradient is zero they add nothing, and where it is not
        # (a model that pools over padding), they are part of the sample's gradient
        return ids, keep, sample

    def row_keys(self, use: ModuleCall) -> torch.Tensor:
        """Sorted unique `sample * num_embeddings + token id` over the kept positions."""
        ids, keep, sample = self._tokens(use)
        return torch.unique(sample[keep] * self.module.num_embeddings + ids[keep])

    def backward(self, use, grad_outputs):
        (g,) = grad_outputs
        ids, keep, sample = self._tokens(use)
        g = g.float().reshape(*ids.shape, -1)
        self.sink.add_rows(self.params["weight"], g[keep], ids[keep], sample[keep])


class NormRule(Rule):
    """`nn.LayerNorm` / `nn.RMSNorm`: `y = x̂ * w + b`, so the per-sample gradients are sums over positions."""

    @classmethod
    def applies(cls, module, local_names):
        return local_names <= {"weight", "bias"}

    def backward(self, use, grad_outputs):
        (g,) = grad_outputs
        x = _first_input(use).float()
        shape = tuple(self.module.normalized_shape)
        if isinstance(self.module, nn.LayerNorm):
            x_hat = F.layer_norm(x, shape, None, None, self.module.eps)
        else:
            x_hat = F.rms_norm(x, shape, None, self.module.eps)
        n = x.shape[0]
        g = g.float().reshape(n, -1, *shape)
        if "weight" in self.params:
            self.sink.add_per_sample(self.params["weight"], (g * x_hat.reshape(g.shape)).sum(1), 0)
        if "bias" in self.params:
            self.sink.add_per_sample(self.params["bias"], g.sum(1), 0)


class BatchNormRule(Rule):
    """`nn.BatchNorm*d` in eval mode: an affine map of `x̂ = (x - running_mean) / sqrt(running_var + eps)`."""

    @classmethod
    def applies(cls, module, local_names):
        return not module.training and module.track_running_stats  # eval mode: running statistics, no batch ones

    def backward(self, use, grad_outputs):
        (g,) = grad_outputs
        bn = self.module
        x = _first_input(use).float()
        n, channels = x.shape[0], x.shape[1]
        shape = (1, channels) + (1,) * (x.dim() - 2)
        x_hat = (x - bn.running_mean.float().view(shape)) * torch.rsqrt(bn.running_var.float().view(shape) + bn.eps)
        g = g.float()
        if "weight" in self.params:
            self.sink.add_per_sample(self.params["weight"], (g * x_hat).reshape(n, channels, -1).sum(-1), 0)
        if "bias" in self.params:
            self.sink.add_per_sample(self.params["bias"], g.reshape(n, channels, -1).sum(-1), 0)


# per-sample convolution gradients are squared and summed in chunks of at most this size (and of the memory budget),
# so that each chunk is still in cache when it is squared
_CACHE_BYTES = 2**20


class Conv2dRule(Rule):
    """`nn.Conv2d` (any stride, padding, dilation, groups): a sample's weight gradient is `sum_l g_l a_lᵀ` over
    output positions `l`, with `a_l` the unfolded input patch (`F.unfold`), one batched matrix product per group.

    With one output position (`L == 1`: a feature map reduced to 1x1), `sum_n (g_n a_nᵀ)² = (g²)ᵀ (a²)`, one matrix
    product that never materialises per-sample gradients; otherwise they are squared and summed in cache-sized
    chunks bounded by the memory budget."""

    min_input_dim = 4  # `[N, C, H, W]`; an unbatched `[C, H, W]` input goes to the exact path

    @classmethod
    def applies(cls, module, local_names):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        """The unfolded input `[N, C * kh * kw, L]`, as `F.unfold`; a 1x1 kernel without padding is a strided slice."""
        conv = self.module
        if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
            return x[:, :, :: conv.stride[0], :: conv.stride[1]].flatten(2)
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv.kernel_size, conv.dilation, conv.padding, conv.stride
        last_row, last_column = x.shape[2] + 2 * ph - dh * (kh - 1) - 1, x.shape[3] + 2 * pw - dw * (kw - 1) - 1
        if last_row // sh == 0 and last_column // sw == 0:
            # one output position: its patch is the top-left window of the padded input
            window = F.pad(x, (pw, pw, ph, ph))[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw]
            return window.reshape(x.shape[0], -1, 1)
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)

    def backward(self, use, grad_outputs):
        (g,) = grad_outputs
        conv = self.module
        x = _first_input(use).float()
        n, groups = x.shape[0], conv.groups
        g = g.float().reshape(n, groups, conv.out_channels // groups, -1)  # [N, G, O/G, L]
        if "weight" in self.params:
            name = self.params["weight"]
            cols = self._columns(x)
            cols = cols.reshape(n, groups, -1, cols.shape[-1])  # [N, G, C/G * kh * kw, L]
            if g.shape[-1] == 1 and name not in self.sink.shared:
                # one output position: sum_n (g_n a_nᵀ)² = (g²)ᵀ (a²), per group
                squares = torch.bmm(g[..., 0].square().permute(1, 2, 0), cols[..., 0].square().transpose(0, 1))
                self.sink.add_squares(name, squares.reshape(conv.weight.shape))
            else:
                self._per_sample_weight(name, g, cols)
        if "bias" in self.params:
            self.sink.add_per_sample(self.params["bias"], g.sum(-1).reshape(n, -1), 0)

    def _per_sample_weight(self, name: str, g: torch.Tensor, cols: torch.Tensor) -> None:
        n, groups, length = g.shape[0], g.shape[1], g.shape[-1]
        shape = self.module.weight.shape
        for chunk in chunks(n, 4 * shape.numel(), min(self.budget_bytes, _CACHE_BYTES)):
            size = chunk.stop - chunk.start
            g_part = g[chunk].reshape(size * groups, -1, length)  # [c * G, O/G, L]
            cols_part = cols[chunk].reshape(size * groups, -1, length)  # [c * G, K/G, L]
            grads = torch.bmm(g_part, cols_part.transpose(1, 2))
            self.sink.add_per_sample(name, grads.reshape(size, *shape), chunk.start)


class FunctionalRule(Rule):
    """Any module: per-sample vector-Jacobian products of its own parameters, by `torch.func` or a loop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_vmap = True

    def accepts(self, use, outputs, n):
        """Every tensor input is per sample (`n` rows), shared by the batch (one row) or a scalar, and every output
        it differentiates has `n` rows: then a sample's slice of the inputs gives that sample's outputs."""
        inputs = [t for t in pytree.tree_leaves((use.inputs, use.kwargs)) if isinstance(t, torch.Tensor)]
        if not all(t.dim() == 0 or t.shape[0] in (1, n) for t in inputs):
            return False
        if not any(t.dim() > 0 and t.shape[0] == n for t in inputs):
            return False
        return bool(outputs) and all(t.dim() > 0 and t.shape[0] == n for t in outputs)

    def backward(self, use, grad_outputs):
        present = [(i, g.float()) for i, g in enumerate(grad_outputs) if g is not None]
        if not present:
            return
        values = {k: self.module.get_parameter(k).detach() for k in self.params}
        leaves, spec = pytree.tree_flatten((use.inputs, use.kwargs))
        n = present[0][1].shape[0]
        grads = None
        if self.use_vmap:
            try:
                grads = self._vmap_grads(values, leaves, spec, present, n)
            except Exception:  # noqa: BLE001 - vmap cannot trace data-dependent code; the loop below can
                self.use_vmap = False
        if grads is None:
            grads = self._loop_grads(values, leaves, spec, present, n)
        for k, name in self.params.items():
            self.sink.add_per_sample(name, grads[k].float(), 0)

    def _dot(self, values, leaves, spec, present) -> torch.Tensor:
        """`<module output, output gradient>`: its gradient in the parameters is their vector-Jacobian product."""
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        outputs = [t for t in pytree.tree_leaves(torch.func.functional_call(self.module, values, args, kwargs))]
        outputs = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return sum((outputs[i].float() * grad).sum() for i, grad in present)

    def _vmap_grads(self, values, leaves, spec, present, n):
        batched = [i for i, leaf in enumerate(leaves) if _in_dim(leaf, n) == 0]

        def one_sample(values, batched_leaves, grads):
            sample_leaves = list(leaves)
            for i, leaf in zip(batched, batched_leaves):
                sample_leaves[i] = leaf.unsqueeze(0)
            return self._dot(values, sample_leaves, spec, [(i, g.unsqueeze(0)) for (i, _), g in zip(present, grads)])

        per_sample = torch.func.vmap(torch.func.grad(one_sample), in_dims=(None, 0, 0))
        return per_sample(values, [leaves[i] for i in batched], [g for _, g in present])

    def _loop_grads(self, values, leaves, spec, present, n):
        per_sample = {k: [] for k in values}
        for s in range(n):
            leaf_values = {k: v.clone().requires_grad_() for k, v in values.items()}
            sample_leaves = [leaf[s : s + 1] if _in_dim(leaf, n) == 0 else leaf for leaf in leaves]
            with torch.enable_grad():
                dot = self._dot(leaf_values, sample_leaves, spec, [(i, g[s : s + 1]) for i, g in present])
                results = torch.autograd.grad(dot, list(leaf_values.values()), allow_unused=True)
            for (k, v), grad in zip(leaf_values.items(), results):
                per_sample[k].append(torch.zeros_like(v) if grad is None else grad)
        return {k: torch.stack(v) for k, v in per_sample.items()}


class SequenceFirstRule(FunctionalRule):
    """`nn.MultiheadAttention`: per sample through `torch.func` when `batch_first`; sequence-first (the default
    `[T, N, d]`), it goes to the engine's exact per-sample path."""

    def accepts(self, use, outputs, n):
        return bool(getattr(self.module, "batch_first", False)) and super().accepts(use, outputs, n)


class ExactPathRule(Rule):
    """No per-layer rule: the module's parameters always take the engine's exact path (one pass of the whole model
    per sample). Register it for a module type whose layout the engine should not trust:
    `register_rule(MyLayer, ExactPathRule)`."""

    def accepts(self, use, outputs, n):
        return False


def refusal(module: nn.Module) -> str | None:
    """Why the per-sample Fisher of `module`'s parameters is undefined, or `None`: samples must not interact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        return "normalises each batch with its own statistics (track_running_stats=False), so samples interact"
    return None


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters a module's forward uses directly: its own, and those of its parameter containers."""
    yield from module.named_parameters(recurse=False)
    for child_name, child in module.named_children():
        if isinstance(child, nn.ParameterDict | nn.ParameterList):
            for key, p in child.named_parameters(recurse=False):
                yield f"{child_name}.{key}", p


def _in_dim(value, n: int) -> int | None:
    return 0 if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else None


def _first_input(use: ModuleCall) -> torch.Tensor:
    return use.inputs[0] if use.inputs else next(iter(use.kwargs.values()))


# The rule of each module type: exact type matches only, since a subclass may compute its output differently (a
# quantised Linear, say); every other module that owns parameters in scope gets `FunctionalRule`.
RULES: dict[type[nn.Module], type[Rule]] = {
    nn.Linear: LinearRule,
    nn.Embedding: EmbeddingRule,
    nn.LayerNorm: NormRule,
    nn.RMSNorm: NormRule,
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
    nn.BatchNorm3d: BatchNormRule,
    nn.SyncBatchNorm: BatchNormRule,
    nn.Conv2d: Conv2dRule,
    nn.MultiheadAttention: SequenceFirstRule,
}
if Conv1D is not None:
    RULES[Conv1D] = Conv1DRule


def register_rule(module_type: type[nn.Module], rule: type[Rule]) -> None:
    """Compute the Fisher of modules of exactly `module_type` with `rule` (for custom layers)."""
    RULES[module_type] = rule


def rule_for(module: nn.Module, local_names: set[str]) -> type[Rule]:
    """The rule of `module` whose own parameters in scope are `local_names`: its registered rule where that rule
    covers the module's configuration, else the exact `FunctionalRule`."""
    rule = RULES.get(type(module), FunctionalRule)
    return rule if rule.applies(module, local_names) else FunctionalRule


def expand_broadcast(value, n: int):
    """`value` `[1, ...]` expanded to `[n, ...]`; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    return value
