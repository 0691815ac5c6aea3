"""The Fisher engine's core, `_FisherEngine`: hooks on every module that owns parameters in scope, and one forward
and backward pass per micro-batch that turns each layer's saved input and output gradient into squared per-sample
weight gradients through its rule. It splits batches so that the stash of shared parameters fits the memory bound,
redoes a micro-batch when the recorded pass turns out unusable (`layout.Retry`), and sends the parameters no rule can
serve to the exact per-sample path (`exact.py`); `engine.py` runs it over a data loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import DeepCleanError, DeepCleanRunError
from ..sharding import any_sharded
from .accumulator import FisherAccumulator, ShardedFisherAccumulator
from .exact import ExactPath
from .layout import LayoutMonitor, Retry, per_sample
from .objectives import backward_batch, prepare_decoder_inputs
from .rules import EmbeddingRule, ModuleCall, Rule, expand_broadcast, own_parameters, refusal, rule_for


DEFAULT_CHUNK_MEMORY_MB = 256.0


def _saved(value, copy: bool):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if copy else value
    return value


def _assign_rules(
    model: nn.Module, by_id: Mapping[int, str], sink: FisherAccumulator, budget_bytes: int
) -> tuple[dict[nn.Module, Rule], dict[nn.Module, str], dict[str, str], dict[str, list[nn.Module]]]:
    """A rule for every module that owns parameters in scope (`by_id`: `{id(parameter): name}`).

    Marks in `sink` the parameters that several modules own as shared, and tied input/output embeddings (exactly
    one Embedding and one Linear own the weight) as sparse tied.

    Returns:
        `(rules, labels, module_names, owners)`: `{module: rule}`, `{module: "name (type)"}`, `{parameter: the label
        of its first owner}` and `{parameter: the modules that own it}`.

    Raises:
        DeepCleanError: for a module whose per-sample Fisher is undefined (`rules.refusal`).
    """
    rules: dict[nn.Module, Rule] = {}
    labels: dict[nn.Module, str] = {}
    module_names: dict[str, str] = {}
    owners: dict[str, list[nn.Module]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.ParameterDict | nn.ParameterList):
            continue  # containers are never called: their parameters belong to the module that holds them
        local = {k: by_id[id(p)] for k, p in own_parameters(module) if id(p) in by_id}
        if not local or module in rules:
            continue
        label = f"{module_name} ({type(module).__name__})"
        reason = refusal(module)
        if reason is not None:
            raise DeepCleanError(
                f"Fisher: module {label} {reason}, so its per-sample Fisher is undefined; leave its parameters "
                "out of --scope or switch the layer to running statistics."
            )
        for name in local.values():
            owners.setdefault(name, []).append(module)
            module_names.setdefault(name, label)
        labels[module] = label
        rules[module] = rule_for(module, set(local))(module, local, sink, budget_bytes)
    sink.shared = {name for name, modules in owners.items() if len(modules) > 1}
    # tied input/output embeddings: exactly one Embedding and one Linear own the weight
    for name in sink.shared:
        kinds = sorted(type(r).__name__ for r in rules.values() if r.params.get("weight") == name)
        if len(owners[name]) == 2 and kinds in (
            ["EmbeddingRule", "LinearRule"],
            ["Conv1DRule", "EmbeddingRule"],
        ):
            sink.sparse_tied.add(name)
    return rules, labels, module_names, owners


def _settle_sharing(sink: FisherAccumulator, calls: Mapping[str, int], uses: list[ModuleCall]) -> None:
    """After a recorded forward pass, before any backward pass (so that a retry starts from untouched sums): a
    parameter called more than once is shared from now on, a tied embedding whose two owners were not called once
    each falls back to the stash (both `Retry`); otherwise the rows of each tied embedding's tokens go to
    `sink.tied_keys`."""
    new_shared = {name for name, count in calls.items() if count > 1} - sink.shared
    if new_shared:
        # a module called more than once (a shared layer): contributions must be summed before squaring
        sink.shared |= new_shared
        raise Retry
    sink.tied_keys.clear()
    for name in list(sink.sparse_tied - sink.exact):
        tied_uses = [use for use in uses if use.rule.params.get("weight") == name]
        if calls.get(name, 0) != 2 or len(tied_uses) != 2:
            sink.sparse_tied.discard(name)  # not one call each: fall back to the stash
            raise Retry
        (embedding_use,) = [use for use in tied_uses if isinstance(use.rule, EmbeddingRule)]
        sink.tied_keys[name] = embedding_use.rule.row_keys(embedding_use)


def _refuse_exact_path_on_shards(name: str, module_names: Mapping[str, str], reasons: Mapping[str, str]) -> None:
    raise DeepCleanError(
        f"Fisher: {name!r} in module {module_names.get(name, '?')} needs the exact per-sample path "
        f"({reasons.get(name, 'no rule')}), which does not run on FSDP-sharded weights; expected modules with a "
        "per-sample rule, or run without FSDP (data parallel, or --scope adapter)."
    )


class _FisherEngine:
    """Hooks on every module that owns parameters in scope; one instance per Fisher computation.

    Each parameter in scope gets its squared per-sample gradients in one of three ways, decided per micro-batch:

    - from its module's rule, when every call of the module is laid out by sample (`Rule.accepts`: `n` leading rows
      in and out) and, the first time a call of it has a given layout (`layout.layout_key`), a forward pass on the
      last and first samples gives it those rows of that call (a sequence-first `[T, N, d]` tensor with `T == N` fails
      this); outputs shared by the batch (`[1, ...]`, position embeddings) are expanded to `[N, ...]` as long as they
      only meet per-sample tensors in elementwise arithmetic;
    - from the exact path, one forward and backward pass of the whole model per sample, when its module's call is not
      laid out by sample (OPT's `[N*T, d]` MLP, mixture-of-experts routers and experts, Swin's windows; from the
      first such call on, for the rest of the computation), when it is used outside its module's call in this
      micro-batch (`nn.MultiheadAttention`'s `out_proj`), or when no module call uses it;
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
        self.sharded = any_sharded(params)
        self.sink = ShardedFisherAccumulator(params) if self.sharded else FisherAccumulator(params)
        by_id = {id(p): name for name, p in params.items()}
        self.rules, self.labels, self.module_names, self.owners = _assign_rules(
            model, by_id, self.sink, self.budget_bytes
        )
        self.roots: list[torch.Tensor] = []
        self.uses: list[ModuleCall] = []
        self.partial: list[tuple[Rule, ModuleCall, list]] = []
        self.calls: dict[str, int] = {}
        self.copy_inputs = False
        self.recording = True
        self.shift = True  # token-level logits at t predict the label at t + 1 (causal LM), not at t (seq2seq)
        # layout bookkeeping: modules being called now, outputs expanded over the batch, the layout probe
        self.layout = LayoutMonitor(
            model, self.sink, self.rules, self.labels, by_id, self.owners, self.module_names, self._to_exact
        )
        self.exact_path = ExactPath(model, self.sink, self.module_names)
        # what happened to each parameter over the whole computation
        self.exact_reasons: dict[str, str] = {}
        self.covered: set[str] = set()

    # -- hooks ------------------------------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        self.layout.enter(module)

    def _forward_hook(self, module, args, kwargs, output):
        self.layout.leave(module)
        if self.layout.probing:
            self.layout.probe_call(module, args, kwargs, output)
            return None
        if not self.recording:
            return None  # a rule or the exact path is recomputing this module
        watching, self.layout.watching = self.layout.watching, False
        try:
            return self._record(module, args, kwargs, output)
        finally:
            self.layout.watching = watching

    def _record(self, module, args, kwargs, output):
        rule = self.rules[module]
        for name in rule.params.values():
            self.calls[name] = self.calls.get(name, 0) + 1
        leaves, spec = pytree.tree_flatten(output)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        n = self.sink.batch_size
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        self.layout.check_classes(inputs + [leaves[i] for i in slots])
        broadcast = (
            n > 1
            and module not in self.layout.no_expand
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
        if module in self.layout.not_by_sample or not rule.accepts(use, outputs, n):
            # rows that are not samples here (tokens flattened or dispatched, a sequence-first layout) are not
            # trusted in a later call whose shapes happen to match either
            self.layout.not_by_sample.add(module)
            self._to_exact(rule.params.values(), f"{self.labels[module]} is not laid out one row per sample")
            self.layout.record(module, None)
            return None
        self.layout.record(module, None if broadcast else inputs + outputs)
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
                tensor = self.layout.mark_expanded(expand_broadcast(tensor, n), module)
            leaves[i] = tensor
            tensor.register_hook(make_hook(slot))
        return pytree.tree_unflatten(leaves, spec) if changed else None

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
            self.sink.commit()
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
            with self.layout.watched_parameters(self.params.values()):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)

    # -- passes ---------------------------------------------------------------------------------------------

    def micro_batch_size(self, batch_size: int) -> int:
        stashed = sum(self.params[name].numel() for name in self.sink.shared - self.sink.sparse_tied) * 4
        if not stashed:
            return batch_size
        return max(1, min(batch_size, self.budget_bytes // stashed))

    def run_batch(self, batch: dict[str, torch.Tensor], fisher_type: str, seed: int, first_index: int) -> None:
        labels = batch.pop("labels")
        self.shift = prepare_decoder_inputs(self.model, batch, labels)
        size = labels.shape[0]
        start = 0
        retries = 0
        while start < size:
            step = self.micro_batch_size(size)
            part = {k: v[start : start + step] if per_sample(v, size) else v for k, v in batch.items()}
            try:
                self._run_micro_batch(part, labels[start : start + step], fisher_type, seed, first_index + start)
            except Retry:
                retries += 1
                if retries > 2 + len(self.layout.no_expand) + self.layout.mode:  # the mode: one switch to it
                    raise DeepCleanRunError("Fisher: layer inputs keep changing in place; cannot compute.") from None
                continue
            finally:
                self.roots.clear()
                self.uses.clear()
                self.partial.clear()
                self.layout.expanded.clear()
                self.layout.active.clear()
            start += step

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
        self.layout.trace.clear()
        self.layout.watching = True
        try:
            with torch.enable_grad(), self.layout.watch():
                logits = self.model(**batch).logits
        finally:
            self.layout.watching = False
        self.layout.expanded.clear()
        _settle_sharing(self.sink, self.calls, self.uses)
        if any(t._version != v for use in self.uses for t, v in use.versions):
            self.copy_inputs = True  # the model changes layer inputs in place after use: keep copies
            raise Retry
        self.layout.probe(batch)
        # parameters no module call covers, and that no torch call used outside one: the exact path finds out
        self._to_exact(set(self.params) - set(self.calls), "not used by a call of its module")
        self.covered |= {name for use in self.uses for name in use.rule.params.values()} - self.sink.exact
        labels = backward_batch(
            logits, labels, fisher_type, seed, first_index, self.shift, self.roots, self._finish_pass
        )
        del logits
        self._exact_path(batch, labels, fisher_type)

    def _exact_path(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, fisher_type: str) -> None:
        """The exact path for the parameters in `sink.exact`, with the hooks not recording."""
        params = {name: self.params[name] for name in sorted(self.sink.exact)}
        if not params:
            return
        if self.sharded:
            _refuse_exact_path_on_shards(next(iter(params)), self.module_names, self.exact_reasons)
        self.recording = False
        try:
            self.covered |= self.exact_path.run(params, batch, labels, fisher_type, self.shift)
        finally:
            self.recording = True

    def unused(self) -> list[str]:
        """Parameters in scope that no sample's log-likelihood depended on: their Fisher is exactly zero."""
        return sorted(set(self.params) - self.covered)
