"""Diagonal of the Fisher information, per sample, as DESIGN §2 defines it.

`F_D[i] = (1/|D|) * sum_n (d/dθ_i log p(y_n | x_n; θ))²`, accumulated in float32.

This module holds the exact reference implementation: one backward pass per sample (padding trimmed, so no
work is spent on pad tokens). It is simple and correct for any model; the fast per-layer engine replaces the
inner loop behind the same `compute_fisher_diagonal` / `accumulate_fisher_sums` API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .errors import DeepCleanError, DeepCleanRunError


FisherDiagonal = dict[str, torch.Tensor]
FISHER_TYPES = ("empirical", "true")


def _unwrap(model: nn.Module, accelerator: Accelerator | None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def _sample_slices(batch: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    """Yield each sample of a batch as a batch of one, with trailing padding removed.

    Only *trailing* pad positions are cut: position ids count from the first column, so cutting leading pads
    would change the result.
    """
    size = next(iter(batch.values())).shape[0]
    mask = batch.get("attention_mask")
    for n in range(size):
        sample = {k: v[n : n + 1] for k, v in batch.items()}
        if mask is not None:
            nonzero = mask[n].nonzero()
            length = int(nonzero[-1]) + 1 if len(nonzero) else 1
            seq_len = mask.shape[1]
            sample = {k: (v[:, :length] if v.dim() >= 2 and v.shape[1] == seq_len else v) for k, v in sample.items()}
        yield sample


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


def _sampled_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (token level keeps the -100 positions)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=generator).view(probs.shape[:-1])
    flat = flat.to(labels.device)
    if logits.dim() == 3:
        shifted = torch.full_like(labels, -100)
        shifted[:, 1:] = flat[:, :-1]
        return torch.where(labels != -100, shifted, labels)
    return flat


def accumulate_fisher_sums(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
) -> tuple[FisherDiagonal, int]:
    """Sum over samples of the squared per-sample gradient of `log p(y|x)`, and the number of samples.

    Args:
        model: the model (possibly wrapped by `accelerator.prepare`); it is put in eval mode.
        dataloader: yields dict batches with `labels` and the model's inputs.
        params: `{name: parameter}` to compute; default: all trainable parameters.
        fisher_type: `empirical` (dataset labels) or `true` (the model's predictive distribution: the exact
            expectation over classes for classification, one sampled label per token for token-level models).
        accelerator: used for the device and for logging only in this implementation.
        seed: seed of label sampling for the `true` Fisher of token-level models.
        desc: progress-bar label.

    Returns:
        `(sums, count)`: float32 sums keyed by parameter name, and the number of samples.
    """
    if fisher_type not in FISHER_TYPES:
        raise DeepCleanError(f"--fisher_type: got {fisher_type!r}; expected one of {', '.join(FISHER_TYPES)}.")
    unwrapped = _unwrap(model, accelerator)
    if params is None:
        params = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
    if not params:
        raise DeepCleanError("--scope: no parameters in scope to compute a Fisher diagonal for.")
    names = list(params)
    tensors = [params[name] for name in names]
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = accelerator.device if accelerator is not None else tensors[0].device
    generator = torch.Generator().manual_seed(seed)
    show_bar = accelerator.is_local_main_process if accelerator is not None else True
    was_training = unwrapped.training
    unwrapped.eval()
    count = 0
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not show_bar, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            for sample in _sample_slices(batch):
                labels = sample.pop("labels")
                logits = model(**sample).logits
                if fisher_type == "true" and logits.dim() == 2:
                    # exact expectation: sum_c p(c|x) * (d log p(c|x))²
                    log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
                    weights = log_probs.detach().exp()
                    for c in range(log_probs.shape[0]):
                        grads = torch.autograd.grad(log_probs[c], tensors, retain_graph=True, allow_unused=True)
                        _add_squares(sums, names, grads, weight=float(weights[c]))
                else:
                    if fisher_type == "true":
                        labels = _sampled_labels(logits, labels, generator)
                    log_likelihood = sample_log_likelihoods(logits, labels).sum()
                    grads = torch.autograd.grad(log_likelihood, tensors, allow_unused=True)
                    _add_squares(sums, names, grads)
                count += 1
    finally:
        unwrapped.train(was_training)
    return sums, count


def _add_squares(sums: FisherDiagonal, names: list[str], grads, weight: float = 1.0) -> None:
    for name, grad in zip(names, grads):
        if grad is not None:
            sums[name].add_(grad.detach().float().square(), alpha=weight)


def compute_fisher_diagonal(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
) -> FisherDiagonal:
    """Mean over samples of the squared per-sample gradient of `log p(y|x)` (DESIGN §2).

    Args: as `accumulate_fisher_sums`.

    Returns:
        `{parameter name: float32 tensor}` with the shape of each parameter.

    Raises:
        DeepCleanError: if the dataloader yields no sample.
        DeepCleanRunError: if the result is not finite, naming the first offending parameter.
    """
    sums, count = accumulate_fisher_sums(
        model, dataloader, params=params, fisher_type=fisher_type, accelerator=accelerator, seed=seed, desc=desc
    )
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
                f"{desc}: the Fisher diagonal of {name!r} is not finite; check the model's numerics (dtype, "
                "loss scale) and the data."
            )
