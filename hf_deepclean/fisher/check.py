"""A self-check of the Fisher engine: its result on a few samples against per-sample autograd, parameter by parameter."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeepCleanRunError
from .core import DEFAULT_CHUNK_MEMORY_MB, _FisherEngine
from .objectives import FISHER_TYPES, prepare_decoder_inputs, sample_log_likelihoods, sampled_token_labels


@dataclass(frozen=True)
class FisherCheck:
    """What `check_fisher_engine` found.

    Attributes:
        seconds: wall time of the check (the engine's pass and the reference's one pass per sample).
        max_relative_error: the largest `max |engine - reference| / max |reference|` over the parameters in scope.
        worst_parameter: the parameter with that error (`None` when every error is 0).
        samples: how many samples were compared.
    """

    seconds: float
    max_relative_error: float
    worst_parameter: str | None
    samples: int


# Entries that are zero in exact arithmetic (attention key biases: softmax is shift-invariant) come out as round-off,
# squares of float32 rounding errors of order eps^2 ~ 1e-14 of the largest entry (measured: 1e-19 against a largest
# entry of 4e-4 on the digits ViT). The scale of each comparison is floored at this fraction of the largest entry
# of the whole diagonal, well above that noise and far below any entry that weighs in a selection.
_FLOOR = 1e-9


def reference_fisher_sums(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    params: Mapping[str, nn.Parameter],
    fisher_type: str = "empirical",
) -> dict[str, torch.Tensor]:
    """`sum_n (d log p(y_n | x_n) / dθ)²` by definition: one forward and backward pass of the model per sample.

    Token-level labels are used as given (for the true Fisher, pass labels already sampled); the true Fisher of a
    classifier is the exact expectation over classes. The model must be in eval mode.
    """
    names = list(params)
    sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    labels = batch["labels"]
    n = labels.shape[0]
    shift = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not shift and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for i in range(n):
            sample = {k: v[i : i + 1] if v.dim() > 0 and v.shape[0] == n else v for k, v in inputs.items()}
            with torch.enable_grad():
                logits = model(**sample).logits
                if fisher_type == "true" and logits.dim() == 2:
                    log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
                    terms = [(log_probs[c], float(log_probs[c].detach().exp())) for c in range(log_probs.shape[0])]
                else:
                    terms = [(sample_log_likelihoods(logits, labels[i : i + 1], shift).sum(), 1.0)]
                for k, (value, weight) in enumerate(terms):
                    grads = torch.autograd.grad(
                        value, [params[name] for name in names], retain_graph=k < len(terms) - 1, allow_unused=True
                    )
                    for name, grad in zip(names, grads):
                        if grad is not None:
                            sums[name] += weight * grad.float().square()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return sums


def relative_errors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """`max |a - b| / max |b|` per parameter, the scale floored at `_FLOOR` times the largest entry of `expected`."""
    top = max((float(v.abs().max()) for v in expected.values() if v.numel()), default=0.0)
    errors = {}
    for name, values in expected.items():
        scale = max(float(values.abs().max()) if values.numel() else 0.0, _FLOOR * top, 1e-30)
        errors[name] = float((actual[name] - values).abs().max()) / scale if values.numel() else 0.0
    return errors


def check_fisher_engine(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    samples: int = 4,
    rtol: float = 1e-4,
    *,
    seed: int = 0,
    first_index: int = 0,
    chunk_memory_mb: float = DEFAULT_CHUNK_MEMORY_MB,
) -> FisherCheck:
    """Compare the engine with per-sample autograd on the first `samples` rows of `batch`, for every parameter in
    scope.

    The comparison runs the engine exactly as a Fisher pass does (hooks, rules, fallbacks, exact path) on those
    rows, and `reference_fisher_sums` on the same rows; for the true Fisher of a token-level model both use the
    labels the engine samples.

    Returns:
        A `FisherCheck` with the time taken and the largest relative error.

    Raises:
        DeepCleanRunError: one line naming the parameter and its module, when an error exceeds `rtol`.
    """
    start = time.perf_counter()
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type: got {fisher_type!r}; expected one of {FISHER_TYPES}.")
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    count = min(samples, batch["labels"].shape[0])
    total = batch["labels"].shape[0]
    part = {k: v[:count] if v.dim() > 0 and v.shape[0] == total else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        engine = _FisherEngine(model, params, chunk_memory_mb)
        if fisher_type == "true" and part["labels"].dim() == 2:
            # token level: sample the labels once, then compare the two computations on the same labels
            inputs = {k: v for k, v in part.items() if k != "labels"}
            shift = prepare_decoder_inputs(model, inputs, part["labels"])
            with torch.no_grad():
                logits = model(**inputs).logits
            part = {**part, "labels": sampled_token_labels(logits, part["labels"], seed, first_index, shift)}
            fisher_type = "empirical"
        with engine.attached():
            engine.run_batch(dict(part), fisher_type, seed, first_index)
        expected = reference_fisher_sums(model, part, params, fisher_type)
    finally:
        model.train(was_training)
    errors = relative_errors(engine.sink.sums, expected)
    worst = max(errors, key=errors.get, default=None)
    error = errors[worst] if worst is not None else 0.0
    if worst is not None and not error <= rtol:  # `not <=` also catches NaN
        raise DeepCleanRunError(
            f"Fisher self-check: {worst!r} in module {engine.module_names.get(worst, '?')} differs from per-sample "
            f"autograd by a relative {error:.3g} (> {rtol:g}) on {count} samples; send its module through the exact "
            "path with hf_deepclean.fisher.register_rule(<module type>, ExactPathRule) and report the model."
        )
    return FisherCheck(time.perf_counter() - start, error, worst if error > 0 else None, count)
