"""Diagonal of the Fisher information, per sample, as docs/method.md defines it, computed near the cost of one backward.

`F_D[i] = (1/|D|) * sum_n (d/dθ_i log p(y_n | x_n; θ))²`, accumulated in float32.

How: one forward and one backward pass per batch of `sum_n log p(y_n|x_n)`. Samples do not interact
in an eval-mode model, so the gradient that reaches a layer's output for sample n is exactly the per-sample one.
Forward hooks keep each layer's input; tensor hooks on each layer's output receive the output gradient during
the backward pass, and a per-layer rule turns (input, output gradient) into squared per-sample weight gradients
right there, then frees both. Parameters are switched to `requires_grad=False` for the pass, so the batch weight
gradient, which is not needed, is never computed: the per-sample rules replace it at about the same cost.

Rules: `nn.Linear` (and transformers' `Conv1D`) with or without a sequence axis, `nn.Embedding` (padding index
respected), `nn.LayerNorm` / `nn.RMSNorm`, `nn.Conv2d`, eval-mode `nn.BatchNorm*d`; peft's LoRA layers are covered by the `nn.Linear` rule
on their `lora_A` / `lora_B` sub-layers. Any other module that owns parameters in scope (for example ViT's
`cls_token`, a custom RMSNorm) gets per-sample gradients from `torch.func` (`vmap` over samples of the module's
vector-Jacobian product with the captured output gradient), or from a loop over samples if `vmap` cannot trace
it. Per-sample gradients are materialised one layer at a time, in chunks of samples whose size is set by
`chunk_memory_mb`. A parameter that receives gradient through more than one module call (tied input/output
embeddings, shared layers) needs the sum of its per-sample contributions before squaring: its per-sample
gradients are kept until the backward pass is done, and batches are split so that this stash fits the same
memory bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..errors import DeepCleanError, DeepCleanRunError
from .accumulator import FisherAccumulator
from .rules import EmbeddingRule, ModuleCall, Rule, expand_broadcast, own_parameters, refusal, rule_for


if TYPE_CHECKING:
    from .check import FisherCheck

FisherDiagonal = dict[str, torch.Tensor]
FISHER_TYPES = ("empirical", "true")
DEFAULT_CHUNK_MEMORY_MB = 256.0

try:  # GPT-2 style layers: a Linear whose weight is stored transposed, `[in, out]`
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


def _unwrap(model: nn.Module, accelerator: Accelerator | None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def sample_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """`log p(y_n | x_n)` per sample.

    Classification: `logits` `[N, C]`, `labels` `[N]`. Token level: `logits` `[N, T, V]`, `labels` `[N, T]` with
    -100 on ignored tokens, and a sample's log-likelihood is the sum over its tokens; logits at position t predict
    the label at t + 1 (causal LM, `shift`) or at t (encoder-decoder, whose decoder reads the labels shifted right).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if logits.dim() == 2:
        return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if shift:
        log_probs, labels = log_probs[:, :-1], labels[:, 1:]
    valid = labels != -100
    token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * valid).sum(dim=-1)


def _sampled_token_labels(
    logits: torch.Tensor, labels: torch.Tensor, seed: int, first_index: int, shift: bool = True
) -> torch.Tensor:
    """Token labels drawn from the model's predictive distribution, where `labels` is not -100.

    Each sample draws from its own generator, seeded by `seed` and the sample's running index, over its
    non-ignored positions only: the draw does not depend on the batch size or on padding.
    """
    offset = 1 if shift else 0
    probs = torch.softmax(logits.detach()[:, : logits.shape[1] - offset].float(), dim=-1).cpu()
    sampled = labels.clone()
    for n in range(labels.shape[0]):
        positions = (labels[n, offset:] != -100).nonzero().squeeze(-1).cpu()
        if len(positions) == 0:
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first_index + n)
        draws = torch.multinomial(probs[n, positions], 1, generator=generator).squeeze(-1)
        sampled[n, positions.to(labels.device) + offset] = draws.to(labels.device)
    return sampled


# ---------------------------------------------------------------------------------------------------------------
# The engine


class _Retry(Exception):
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


class _Watch(TorchFunctionMode):
    """Sees every torch call of the recorded forward pass, for `_FisherEngine.observe`."""

    def __init__(self, engine: _FisherEngine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.engine.watching:
            return func(*args, **kwargs)
        source = self.engine.observe(func, args, kwargs)
        result = func(*args, **kwargs)
        if source is not None and isinstance(result, torch.Tensor):
            self.engine.expanded[id(result)] = (result, source)
        return result


def _tensor_args(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _per_sample(value, n: int) -> bool:
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


class _FisherEngine:
    """Hooks on every module that owns parameters in scope; one instance per Fisher computation.

    Each parameter in scope gets its squared per-sample gradients in one of three ways, decided per micro-batch:

    - from its module's rule, when every call of the module is laid out by sample (`Rule.accepts`: `n` leading rows
      in and out) and, on the first micro-batch that calls it, reversing the samples reverses those rows (a
      sequence-first `[T, N, d]` tensor with `T == N` fails this); outputs shared by the batch (`[1, ...]`, position
      embeddings) are expanded to `[N, ...]` as long as they only meet per-sample tensors in elementwise arithmetic;
    - from the exact path, one forward and backward pass of the whole model per sample, when its module's call is not
      laid out by sample (OPT's `[N*T, d]` MLP, mixture-of-experts routers and experts, Swin's windows), when it
      is used outside its module's call (`nn.MultiheadAttention`'s `out_proj`), or when no module call uses it;
    - or it is recorded as unused by the data (`unused`), when the exact path finds no gradient for it.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter], chunk_memory_mb: float):
        self.model = model
        self.params = dict(params)
        self.budget_bytes = int(chunk_memory_mb * 2**20)
        model_params = {id(p) for p in model.parameters()}
        missing = [name for name, p in params.items() if id(p) not in model_params]
        if missing:
            raise DeepCleanError(f"--scope: {missing[:3]} are not parameters of the model.")
        self.sink = FisherAccumulator(params)
        by_id = {id(p): name for name, p in params.items()}
        self.param_names = by_id
        self.rules: dict[nn.Module, Rule] = {}
        self.labels: dict[nn.Module, str] = {}
        self.module_names: dict[str, str] = {}
        self.owners: dict[str, list[nn.Module]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, nn.ParameterDict | nn.ParameterList):
                continue  # containers are never called: their parameters belong to the module that holds them
            local = {k: by_id[id(p)] for k, p in own_parameters(module) if id(p) in by_id}
            if not local or module in self.rules:
                continue
            label = f"{module_name} ({type(module).__name__})"
            reason = refusal(module)
            if reason is not None:
                raise DeepCleanError(
                    f"Fisher: module {label} {reason}, so its per-sample Fisher is undefined; leave its parameters "
                    "out of --scope or switch the layer to running statistics."
                )
            for name in local.values():
                self.owners.setdefault(name, []).append(module)
                self.module_names.setdefault(name, label)
            self.labels[module] = label
            self.rules[module] = rule_for(module, set(local))(module, local, self.sink, self.budget_bytes)
        self.sink.shared = {name for name, owners in self.owners.items() if len(owners) > 1}
        # tied input/output embeddings: exactly one Embedding and one Linear own the weight
        for name in self.sink.shared:
            kinds = sorted(type(r).__name__ for r in self.rules.values() if r.params.get("weight") == name)
            if len(self.owners[name]) == 2 and kinds in (
                ["EmbeddingRule", "LinearRule"],
                ["Conv1DRule", "EmbeddingRule"],
            ):
                self.sink.sparse_tied.add(name)
        self.roots: list[torch.Tensor] = []
        self.uses: list[ModuleCall] = []
        self.partial: list[tuple[Rule, ModuleCall, list]] = []
        self.calls: dict[str, int] = {}
        self.copy_inputs = False
        self.recording = True
        self.shift = True  # token-level logits at t predict the label at t + 1 (causal LM), not at t (seq2seq)
        # layout bookkeeping: modules being called now, outputs expanded over the batch, the reverse-order probe
        self.active: dict[nn.Module, int] = {}
        self.watching = False
        self.expanded: dict[int, tuple[torch.Tensor, nn.Module]] = {}
        self.no_expand: set[nn.Module] = set()
        self.probing = False
        self.probe_calls: dict[nn.Module, int] = {}
        self.trace: dict[nn.Module, list[list[torch.Tensor] | None]] = {}
        self.probed: set[nn.Module] = set()
        self.not_by_sample: set[nn.Module] = set()
        # what happened to each parameter over the whole computation
        self.exact_reasons: dict[str, str] = {}
        self.covered: set[str] = set()

    # -- hooks ------------------------------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        self.active[module] = self.active.get(module, 0) + 1

    def _forward_hook(self, module, args, kwargs, output):
        if self.active.get(module):
            self.active[module] -= 1
        if self.probing:
            self._probe_call(module, args, kwargs, output)
            return None
        if not self.recording:
            return None  # a rule or the exact path is recomputing this module
        watching, self.watching = self.watching, False
        try:
            return self._record(module, args, kwargs, output)
        finally:
            self.watching = watching

    def _record(self, module, args, kwargs, output):
        rule = self.rules[module]
        for name in rule.params.values():
            self.calls[name] = self.calls.get(name, 0) + 1
        leaves, spec = pytree.tree_flatten(output)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        n = self.sink.batch_size
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        broadcast = (
            n > 1
            and module not in self.no_expand
            and bool(slots)
            and all(t.shape[0] == 1 for t in inputs)
            and all(leaves[i].dim() > 0 and leaves[i].shape[0] == 1 for i in slots)
        )
        if broadcast:
            # a call on inputs shared by the batch (position ids [1, T], say) whose output is broadcast over it:
            # expanding the output to the batch makes its gradient per sample (`observe` checks how it is used);
            # the inputs are expanded to match
            args, kwargs = pytree.tree_map(lambda t: expand_broadcast(t, n), (args, kwargs))
        use = ModuleCall(
            tuple(_saved(a, self.copy_inputs) for a in args),
            {k: _saved(v, self.copy_inputs) for k, v in kwargs.items()},
            rule,
        )
        outputs = [expand_broadcast(leaves[i], n) if broadcast else leaves[i] for i in slots]
        trace = self.trace.setdefault(module, []) if module not in self.probed else None
        if module in self.not_by_sample or not rule.accepts(use, outputs, n):
            self._to_exact(rule.params.values(), f"{self.labels[module]} is not laid out one row per sample")
            if trace is not None:
                trace.append(None)
            return None
        if trace is not None:
            trace.append(None if broadcast else [t.detach().clone() for t in inputs + outputs])
        saved = pytree.tree_leaves((use.inputs, use.kwargs))
        use.versions = [(t, t._version) for t in saved if isinstance(t, torch.Tensor)]
        self.uses.append(use)
        grads: list[torch.Tensor | None] = [None] * len(slots)
        state = [rule, use, grads]

        def make_hook(slot: int):
            def hook(grad):
                grads[slot] = grad.detach() if grads[slot] is None else grads[slot] + grad.detach()
                if all(g is not None for g in grads):
                    self._apply(state)
                elif state not in self.partial:
                    self.partial.append(state)

            return hook

        changed = broadcast
        for slot, i in enumerate(slots):
            tensor = leaves[i]
            if not tensor.requires_grad:
                tensor = tensor.detach().requires_grad_()
                self.roots.append(tensor)
                changed = True
            if broadcast:
                tensor = expand_broadcast(tensor, n)
                self.expanded[id(tensor)] = (tensor, module)
            leaves[i] = tensor
            tensor.register_hook(make_hook(slot))
        return pytree.tree_unflatten(leaves, spec) if changed else None

    def observe(self, func, args: tuple, kwargs: dict) -> nn.Module | None:
        """One torch call of the recorded forward pass: a parameter in scope used outside a call of a module that
        owns it (no rule sees that use) goes to the exact path; an expanded output used other than by broadcasting
        arithmetic is not expanded again (`_Retry`).

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
                self._to_exact([name], f"used by `{op}` outside a call of {self.module_names.get(name, '?')}")
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
            raise _Retry
        return None

    def _to_exact(self, names: Iterable[str], reason: str) -> None:
        for name in names:
            self.sink.exact.add(name)
            self.exact_reasons.setdefault(name, reason)

    def _apply(self, state) -> None:
        rule, use, grads = state
        if state in self.partial:
            self.partial.remove(state)
        self.recording = False
        try:
            rule.backward(use, grads)
        finally:
            self.recording = True
            grads[:] = [None] * len(grads)

    def _finish_pass(self) -> None:
        # outputs that did not reach the objective get no gradient: apply the rule with the ones that did
        for state in list(self.partial):
            self._apply(state)
        self.sink.flush()

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for m in self.rules]
        handles += [m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.rules]
        grad_flags = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for p in grad_flags:
                p.requires_grad_(False)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)

    # -- the reverse-order probe ------------------------------------------------------------------------------

    def _probe_call(self, module, args, kwargs, output) -> None:
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

    def _probe_layouts(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Run the forward pass again with the samples in reverse order: a module laid out by sample sees the same
        rows, reversed. Modules that do not go to the exact path from this micro-batch on."""
        n = self.sink.batch_size
        order = torch.arange(n - 1, -1, -1)
        reversed_batch = {k: v[order.to(v.device)] if _per_sample(v, n) else v for k, v in batch.items()}
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
                self._to_exact(self.rules[module].params.values(), f"{self.labels[module]} mixes samples in a row")
        self.probed |= set(self.trace)
        self.trace.clear()

    # -- passes ---------------------------------------------------------------------------------------------

    def micro_batch_size(self, batch_size: int) -> int:
        stashed = sum(self.sink.sums[name].numel() for name in self.sink.shared - self.sink.sparse_tied) * 4
        if not stashed:
            return batch_size
        return max(1, min(batch_size, self.budget_bytes // stashed))

    def run_batch(self, batch: dict[str, torch.Tensor], fisher_type: str, seed: int, first_index: int) -> None:
        labels = batch.pop("labels")
        self._prepare_decoder_inputs(batch, labels)
        size = labels.shape[0]
        start = 0
        retries = 0
        while start < size:
            step = self.micro_batch_size(size)
            part = {k: v[start : start + step] if _per_sample(v, size) else v for k, v in batch.items()}
            try:
                self._run_micro_batch(part, labels[start : start + step], fisher_type, seed, first_index + start)
            except _Retry:
                retries += 1
                if retries > 2 + len(self.no_expand):
                    raise DeepCleanRunError("Fisher: layer inputs keep changing in place; cannot compute.") from None
                continue
            finally:
                self.roots.clear()
                self.uses.clear()
                self.partial.clear()
                self.expanded.clear()
                self.active.clear()
            start += step

    def _prepare_decoder_inputs(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Encoder-decoder models: the decoder reads the labels shifted right, and logits at t predict label t."""
        config = getattr(self.model, "config", None)
        self.shift = not getattr(config, "is_encoder_decoder", False)
        if self.shift or "decoder_input_ids" in batch or "decoder_inputs_embeds" in batch:
            return
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise DeepCleanError(
                f"Fisher: {type(self.model).__name__} is an encoder-decoder model that cannot build decoder inputs "
                "from labels; expected batches with `decoder_input_ids`."
            )
        batch["decoder_input_ids"] = prepare(labels=labels)

    def _run_micro_batch(self, batch, labels, fisher_type, seed, first_index) -> None:
        self.sink.batch_size = labels.shape[0]
        mask = batch.get("attention_mask")
        self.sink.lengths = None
        if mask is not None and mask.dim() == 2:
            positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
            self.sink.lengths = (positions * (mask != 0)).amax(dim=1).clamp(min=1)
            self.sink.padded_length = mask.shape[1]
        self.calls.clear()
        self.sink.exact = set()
        self.trace.clear()
        self.watching = True
        try:
            with torch.enable_grad(), _Watch(self):
                logits = self.model(**batch).logits
        finally:
            self.watching = False
        self.expanded.clear()
        # checked before any backward pass, so a retry starts from untouched sums
        new_shared = {name for name, count in self.calls.items() if count > 1} - self.sink.shared
        if new_shared:
            # a module called more than once (a shared layer): contributions must be summed before squaring
            self.sink.shared |= new_shared
            raise _Retry
        self.sink.tied_keys.clear()
        for name in list(self.sink.sparse_tied - self.sink.exact):
            uses = [use for use in self.uses if use.rule.params.get("weight") == name]
            if self.calls.get(name, 0) != 2 or len(uses) != 2:
                self.sink.sparse_tied.discard(name)  # not one call each: fall back to the stash
                raise _Retry
            (embedding_use,) = [use for use in uses if isinstance(use.rule, EmbeddingRule)]
            self.sink.tied_keys[name] = embedding_use.rule.row_keys(embedding_use)
        if any(t._version != v for use in self.uses for t, v in use.versions):
            self.copy_inputs = True  # the model changes layer inputs in place after use: keep copies
            raise _Retry
        if self.sink.batch_size > 1 and any(entry is not None for calls in self.trace.values() for entry in calls):
            with torch.enable_grad():
                self._probe_layouts(batch)
        self.trace.clear()
        # parameters no module call covers, and that no torch call used outside one: the exact path finds out
        self._to_exact(set(self.params) - set(self.calls), "not used by a call of its module")
        self.covered |= {name for use in self.uses for name in use.rule.params.values()} - self.sink.exact
        if fisher_type == "true" and logits.dim() == 2:
            # exact expectation over classes: sum_c p(c|x) (d log p(c|x))², as C passes of sqrt(p)-scaled grads
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            weights = log_probs.detach().exp().sqrt()
            num_classes = log_probs.shape[-1]
            for c in range(num_classes):
                if self.roots:
                    objective = (weights[:, c] * log_probs[:, c]).sum()
                    torch.autograd.grad(objective, self.roots, retain_graph=c < num_classes - 1, allow_unused=True)
                self._finish_pass()
        else:
            if fisher_type == "true":
                labels = _sampled_token_labels(logits, labels, seed, first_index, self.shift)
            if self.roots:
                objective = sample_log_likelihoods(logits, labels, self.shift).sum()
                torch.autograd.grad(objective, self.roots, allow_unused=True)
            self._finish_pass()
        del logits
        self._exact_path(batch, labels, fisher_type)

    # -- the exact path ---------------------------------------------------------------------------------------

    def _exact_path(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, fisher_type: str) -> None:
        """One forward and backward pass of the whole model per sample for the parameters in `sink.exact`: their
        per-sample gradients by definition, whatever the model does with its batch inside."""
        names = sorted(self.sink.exact)
        if not names:
            return
        params = [self.params[name] for name in names]
        n = self.sink.batch_size
        self.recording = False
        for p in params:
            p.requires_grad_(True)
        try:
            for i in range(n):
                sample = {k: v[i : i + 1] if _per_sample(v, n) else v for k, v in batch.items()}
                with torch.enable_grad():
                    logits = self.model(**sample).logits
                    objectives = self._sample_objectives(logits, labels[i : i + 1], fisher_type)
                    for k, objective in enumerate(objectives):
                        retain = k < len(objectives) - 1
                        grads = torch.autograd.grad(objective, params, retain_graph=retain, allow_unused=True)
                        for name, grad in zip(names, grads):
                            if grad is not None:
                                self.sink.add_exact(name, grad)
                                self.covered.add(name)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            modules = sorted({self.module_names.get(name, name) for name in names})
            raise DeepCleanError(
                f"Fisher: the exact per-sample pass for {', '.join(modules[:3])} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); leave these parameters out of --scope or "
                "register a rule for their module with hf_deepclean.fisher.register_rule."
            ) from error
        finally:
            for p in params:
                p.requires_grad_(False)
            self.recording = True

    def _sample_objectives(self, logits: torch.Tensor, labels: torch.Tensor, fisher_type: str) -> list[torch.Tensor]:
        """The terms whose squared gradients sum to one sample's Fisher (one, or one per class for the true
        Fisher of a classifier, scaled by `sqrt(p(c|x))`)."""
        if fisher_type == "true" and logits.dim() == 2:
            log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
            weights = log_probs.detach().exp().sqrt()
            return [weights[c] * log_probs[c] for c in range(log_probs.shape[0])]
        return [sample_log_likelihoods(logits, labels, self.shift).sum()]

    def unused(self) -> list[str]:
        """Parameters in scope that no sample's log-likelihood depended on: their Fisher is exactly zero."""
        return sorted(set(self.params) - self.covered)


def _saved(value, copy: bool):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if copy else value
    return value


def check_engine(model: nn.Module, batch: Mapping[str, torch.Tensor], params, fisher_type: str, **kwargs):
    from .check import check_fisher_engine  # check.py builds on this module

    return check_fisher_engine(model, batch, params, fisher_type, **kwargs)


@dataclass
class FisherReport:
    """What a Fisher pass did besides summing, filled in by `accumulate_fisher_sums(report=...)`.

    Attributes:
        exact_path: `{parameter: why}` for the parameters whose per-sample gradients came from the exact path (one
            pass of the whole model per sample) in at least one micro-batch.
        unused: parameters in scope that no sample's log-likelihood depends on (their Fisher is exactly zero).
        check: the self-check's result, with `check=True`.
    """

    exact_path: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    check: FisherCheck | None = None


def accumulate_fisher_sums(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
    chunk_memory_mb: float = DEFAULT_CHUNK_MEMORY_MB,
    first_index: int = 0,
    check: bool = False,
    report: FisherReport | None = None,
) -> tuple[FisherDiagonal, int]:
    """Sum over samples of the squared per-sample gradient of `log p(y|x)`, and the number of samples.

    Under several processes each rank sums over its own rows (`hf_deepclean.distributed.process_shard`: every row
    once, no repeats), then one SUM reduce gives every rank the global sums and count.

    Args:
        model: the model, or what `accelerator.prepare` returned for it; it is run in eval mode.
        dataloader: yields dict batches with `labels` and the model's inputs.
        params: `{name: parameter}` to compute; default: all trainable parameters. Names are the unwrapped
            model's.
        fisher_type: `empirical` (dataset labels) or `true` (the model's predictive distribution: the exact
            expectation over classes for classification, one sampled label per token for token-level models).
        accelerator: gives the device, the process layout and the reduce; `None` for a single process.
        seed: seed of label sampling for the `true` Fisher of token-level models.
        desc: progress-bar label.
        chunk_memory_mb: bound on the memory that per-sample gradients of one layer (or of a tied parameter, for
            a whole batch) may take at once.
        first_index: index of the loader's first row in the whole data (this process's shard offset), so that
            labels sampled for the `true` Fisher are seeded per row as on one process.
        check: before the pass, compare the engine with per-sample autograd on 4 samples of the first batch
            (`check_fisher_engine`); a mismatch above 1e-4 raises `DeepCleanRunError`. Its cost goes to `report`.
        report: filled in place, if given: which parameters took the exact per-sample path and why, which ones no
            sample used, and the self-check's result.

    Returns:
        `(sums, count)`: float32 sums keyed by parameter name, and the global number of samples.
    """
    if fisher_type not in FISHER_TYPES:
        raise DeepCleanError(f"--fisher_type: got {fisher_type!r}; expected one of {', '.join(FISHER_TYPES)}.")
    if not (isinstance(chunk_memory_mb, int | float) and math.isfinite(chunk_memory_mb) and chunk_memory_mb > 0):
        raise DeepCleanError(f"--fisher_chunk_memory_mb: got {chunk_memory_mb!r}; expected a number > 0.")
    unwrapped = _unwrap(model, accelerator)
    if params is None:
        params = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
    if not params:
        raise DeepCleanError("--scope: no parameters in scope to compute a Fisher diagonal for.")
    engine = _FisherEngine(unwrapped, params, chunk_memory_mb)
    device = accelerator.device if accelerator is not None else next(iter(params.values())).device
    show_bar = accelerator.is_local_main_process if accelerator is not None else True
    was_training = unwrapped.training
    unwrapped.eval()
    count = 0
    batches = iter(dataloader)
    try:
        if check:
            first = next(batches, None)
            if first is not None:
                first = {k: v.to(device) for k, v in first.items()}
                result = check_engine(unwrapped, first, params, fisher_type, seed=seed, first_index=first_index)
                if report is not None:
                    report.check = result
                batches = itertools.chain([first], batches)
        with engine.attached():
            for batch in tqdm(batches, desc=desc, disable=not show_bar, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                engine.run_batch(batch, fisher_type, seed, first_index + count)
                count += next(iter(batch.values())).shape[0]
    finally:
        unwrapped.train(was_training)
    if report is not None:
        report.exact_path = {name: engine.exact_reasons[name] for name in sorted(engine.exact_reasons)}
        report.unused = engine.unused()
    sums = engine.sink.sums
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum"))
    for name, total in sums.items():
        # the entries are >= 0 (or NaN), so their sum is finite exactly when all of them are
        if not math.isfinite(float(total.sum())):
            raise DeepCleanRunError(
                f"{desc}: the Fisher diagonal of {name!r} in module {engine.module_names.get(name, '?')} is not "
                "finite; expected finite gradients from the model of --model_name_or_path (check its weights, dtype "
                "and loss scale, and the data)."
            )
    return sums, count


def accumulator_bytes(params: Mapping[str, nn.Parameter]) -> dict[str, int]:
    """Memory of DeepClean's per-element state for `params`, whatever the model's dtype.

    Two float32 Fisher sums (forget and retain, 4 bytes each), the float32 ratio (4 bytes) and the bool selection
    mask (1 byte): 13 bytes per element in scope. (The repair adds AdamW's two float32 moments and an anchor copy
    for the parameters that have selected elements.)

    Returns:
        `{"params_in_scope", "fisher_sums", "ratio", "mask", "total"}`, the first a count, the others bytes.
    """
    numel = sum(p.numel() for p in params.values())
    return {"params_in_scope": numel, "fisher_sums": 8 * numel, "ratio": 4 * numel, "mask": numel, "total": 13 * numel}


def compute_fisher_diagonal(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
    chunk_memory_mb: float = DEFAULT_CHUNK_MEMORY_MB,
) -> FisherDiagonal:
    """Mean over samples of the squared per-sample gradient of `log p(y|x)`.

    The result does not depend on the batch size (up to float32 round-off).

    Args: as `accumulate_fisher_sums`.

    Returns:
        `{parameter name: float32 tensor}` with the shape of each parameter.

    Raises:
        DeepCleanError: if the dataloader yields no sample.
        DeepCleanRunError: if the result is not finite, naming the parameter and its module.
    """
    sums, count = accumulate_fisher_sums(
        model,
        dataloader,
        params=params,
        fisher_type=fisher_type,
        accelerator=accelerator,
        seed=seed,
        desc=desc,
        chunk_memory_mb=chunk_memory_mb,
    )
    return fisher_from_sums(sums, count, desc)


def fisher_from_sums(sums: FisherDiagonal, count: int, desc: str = "Fisher") -> FisherDiagonal:
    """The mean `sums / count`, checked.

    Raises:
        DeepCleanError: if `count` is 0 (no sample).
        DeepCleanRunError: if the result is not finite.
    """
    if count == 0:
        raise DeepCleanError(f"{desc}: the data set is empty; expected at least one sample.")
    fisher = {name: total / count for name, total in sums.items()}
    check_finite(fisher, desc)
    return fisher


def check_finite(fisher: FisherDiagonal, desc: str = "Fisher") -> None:
    """Refuse a Fisher diagonal with NaN or inf entries: a ratio built on it would select arbitrary weights."""
    for name, values in fisher.items():
        if not torch.isfinite(values).all():
            raise DeepCleanRunError(
                f"{desc}: the Fisher diagonal of {name!r} is not finite; expected finite gradients from the model of "
                "--model_name_or_path (check its weights, dtype and loss scale, and the data)."
            )
