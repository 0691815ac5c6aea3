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

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..errors import DeepCleanError, DeepCleanRunError
from .accumulator import FisherAccumulator
from .rules import EmbeddingRule, ModuleCall, Rule, expand_broadcast, own_parameters, rule_for


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


def sample_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`log p(y_n | x_n)` per sample.

    Classification: `logits` `[N, C]`, `labels` `[N]`. Token level (causal LM): `logits` `[N, T, V]`, `labels`
    `[N, T]` with -100 on ignored tokens; logits at position t predict the label at t + 1, and a sample's
    log-likelihood is the sum over its tokens.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if logits.dim() == 2:
        return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    log_probs, labels = log_probs[:, :-1], labels[:, 1:]
    valid = labels != -100
    token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * valid).sum(dim=-1)


def _sampled_token_labels(logits: torch.Tensor, labels: torch.Tensor, seed: int, first_index: int) -> torch.Tensor:
    """Token labels drawn from the model's predictive distribution, where `labels` is not -100.

    Each sample draws from its own generator, seeded by `seed` and the sample's running index, over its
    non-ignored positions only: the draw does not depend on the batch size or on padding.
    """
    probs = torch.softmax(logits.detach()[:, :-1].float(), dim=-1).cpu()
    sampled = labels.clone()
    for n in range(labels.shape[0]):
        positions = (labels[n, 1:] != -100).nonzero().squeeze(-1).cpu()
        if len(positions) == 0:
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first_index + n)
        draws = torch.multinomial(probs[n, positions], 1, generator=generator).squeeze(-1)
        sampled[n, positions.to(labels.device) + 1] = draws.to(labels.device)
    return sampled


# ---------------------------------------------------------------------------------------------------------------
# Accumulation: sums of squares, and a stash for parameters with several uses in one pass


# ---------------------------------------------------------------------------------------------------------------
# Per-layer rules


# ---------------------------------------------------------------------------------------------------------------
# The engine


class _Retry(Exception):
    """The micro-batch must be redone (a saved input changed in place, or a parameter turned out shared)."""


class _FisherEngine:
    """Hooks on every module that owns parameters in scope; one instance per Fisher computation."""

    def __init__(self, model: nn.Module, params: Mapping[str, nn.Parameter], chunk_memory_mb: float):
        self.model = model
        self.budget_bytes = int(chunk_memory_mb * 2**20)
        model_params = {id(p) for p in model.parameters()}
        missing = [name for name, p in params.items() if id(p) not in model_params]
        if missing:
            raise DeepCleanError(f"--scope: {missing[:3]} are not parameters of the model.")
        self.sink = FisherAccumulator(params)
        by_id = {id(p): name for name, p in params.items()}
        self.rules: dict[nn.Module, Rule] = {}
        self.module_names: dict[str, str] = {}
        owners: dict[str, int] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, nn.ParameterDict | nn.ParameterList):
                continue  # containers are never called: their parameters belong to the module that holds them
            local = {k: by_id[id(p)] for k, p in own_parameters(module) if id(p) in by_id}
            if not local or module in self.rules:
                continue
            for name in local.values():
                owners[name] = owners.get(name, 0) + 1
                self.module_names.setdefault(name, f"{module_name} ({type(module).__name__})")
            self.rules[module] = rule_for(module, set(local))(module, local, self.sink, self.budget_bytes)
        self.sink.shared = {name for name, count in owners.items() if count > 1}
        # tied input/output embeddings: exactly one Embedding and one Linear own the weight
        for name in self.sink.shared:
            kinds = sorted(type(r).__name__ for r in self.rules.values() if r.params.get("weight") == name)
            if owners[name] == 2 and kinds in (["EmbeddingRule", "LinearRule"], ["Conv1DRule", "EmbeddingRule"]):
                self.sink.sparse_tied.add(name)
        self.roots: list[torch.Tensor] = []
        self.uses: list[ModuleCall] = []
        self.partial: list[tuple[Rule, ModuleCall, list]] = []
        self.calls: dict[str, int] = {}
        self.copy_inputs = False
        self.recording = True

    # -- hooks ------------------------------------------------------------------------------------------------

    def _forward_hook(self, module, args, kwargs, output):
        if not self.recording:
            return None  # a rule is recomputing this module for per-sample gradients
        rule = self.rules[module]
        for name in rule.params.values():
            self.calls[name] = self.calls.get(name, 0) + 1
        leaves, spec = pytree.tree_flatten(output)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        n = self.sink.batch_size
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        broadcast = n > 1 and all(t.shape[0] == 1 for t in inputs) and all(leaves[i].shape[0] == 1 for i in slots)
        if broadcast:
            # a call on inputs shared by the batch (position ids [1, T], say) whose output is broadcast over it:
            # expanding the output to the batch makes its gradient per sample; the inputs are expanded to match
            args, kwargs = pytree.tree_map(lambda t: expand_broadcast(t, n), (args, kwargs))
        use = ModuleCall(
            tuple(_saved(a, self.copy_inputs) for a in args),
            {k: _saved(v, self.copy_inputs) for k, v in kwargs.items()},
            rule,
        )
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
            leaves[i] = tensor
            tensor.register_hook(make_hook(slot))
        return pytree.tree_unflatten(leaves, spec) if changed else None

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
        handles = [m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.rules]
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

    # -- passes ---------------------------------------------------------------------------------------------

    def micro_batch_size(self, batch_size: int) -> int:
        stashed = sum(self.sink.sums[name].numel() for name in self.sink.shared - self.sink.sparse_tied) * 4
        if not stashed:
            return batch_size
        return max(1, min(batch_size, self.budget_bytes // stashed))

    def run_batch(self, batch: dict[str, torch.Tensor], fisher_type: str, seed: int, first_index: int) -> None:
        labels = batch.pop("labels")
        size = labels.shape[0]
        start = 0
        retries = 0
        while start < size:
            step = self.micro_batch_size(size)
            part = {k: v[start : start + step] for k, v in batch.items()}
            try:
                self._run_micro_batch(part, labels[start : start + step], fisher_type, seed, first_index + start)
            except _Retry:
                retries += 1
                if retries > 2:
                    raise DeepCleanRunError("Fisher: layer inputs keep changing in place; cannot compute.") from None
                continue
            finally:
                self.roots.clear()
                self.uses.clear()
                self.partial.clear()
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
        with torch.enable_grad():
            logits = self.model(**batch).logits
        # checked before any backward pass, so a retry starts from untouched sums
        new_shared = {name for name, count in self.calls.items() if count > 1} - self.sink.shared
        if new_shared:
            # a module called more than once (a shared layer): contributions must be summed before squaring
            self.sink.shared |= new_shared
            raise _Retry
        self.sink.tied_keys.clear()
        for name in list(self.sink.sparse_tied):
            uses = [use for use in self.uses if use.rule.params.get("weight") == name]
            if self.calls.get(name, 0) != 2 or len(uses) != 2:
                self.sink.sparse_tied.discard(name)  # not one call each: fall back to the stash
                raise _Retry
            (embedding_use,) = [use for use in uses if isinstance(use.rule, EmbeddingRule)]
            self.sink.tied_keys[name] = embedding_use.rule.row_keys(embedding_use)
        if any(t._version != v for use in self.uses for t, v in use.versions):
            self.copy_inputs = True  # the model changes layer inputs in place after use: keep copies
            raise _Retry
        if not self.roots:
            return  # nothing in scope influences the output: its Fisher is zero
        if fisher_type == "true" and logits.dim() == 2:
            # exact expectation over classes: sum_c p(c|x) (d log p(c|x))², as C passes of sqrt(p)-scaled grads
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            weights = log_probs.detach().exp().sqrt()
            num_classes = log_probs.shape[-1]
            for c in range(num_classes):
                objective = (weights[:, c] * log_probs[:, c]).sum()
                torch.autograd.grad(objective, self.roots, retain_graph=c < num_classes - 1, allow_unused=True)
                self._finish_pass()
            return
        if fisher_type == "true":
            labels = _sampled_token_labels(logits, labels, seed, first_index)
        objective = sample_log_likelihoods(logits, labels).sum()
        torch.autograd.grad(objective, self.roots, allow_unused=True)
        self._finish_pass()


def _saved(value, copy: bool):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if copy else value
    return value


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
    try:
        with engine.attached():
            for batch in tqdm(dataloader, desc=desc, disable=not show_bar, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                engine.run_batch(batch, fisher_type, seed, first_index + count)
                count += next(iter(batch.values())).shape[0]
    finally:
        unwrapped.train(was_training)
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
