"""What the Fisher engine differentiates: `log p(y_n | x_n)` per sample, for the empirical Fisher (dataset labels) or
the true Fisher (the exact expectation over classes for a classifier, one label per token drawn from the model's
predictive distribution for a token-level model); the backward passes of one micro-batch and the per-sample terms of
the exact path built on it; and the decoder inputs that an encoder-decoder model reads. Token-level logits at position
t predict the label at t + 1 for a causal LM (`shift`) and at t for an encoder-decoder model, whose decoder reads the
labels shifted right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import DeepCleanError


FISHER_TYPES = ("empirical", "true")


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


def sampled_token_labels(
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


def backward_batch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fisher_type: str,
    seed: int,
    first_index: int,
    shift: bool,
    roots: list[torch.Tensor],
    finish_pass: Callable[[], None],
) -> torch.Tensor:
    """The backward passes of one micro-batch, from its logits to `roots` (the tensors whose gradient hooks apply
    the rules), each followed by `finish_pass`; returns the labels the passes used (sampled ones for the true Fisher
    of a token-level model).

    The true Fisher of a classifier is the exact expectation over classes, `sum_c p(c|x) (d log p(c|x))²`: one pass
    per class, of the log-likelihoods scaled by `sqrt(p(c|x))`. Otherwise one pass of `sum_n log p(y_n | x_n)`.
    """
    if fisher_type == "true" and logits.dim() == 2:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        weights = log_probs.detach().exp().sqrt()
        num_classes = log_probs.shape[-1]
        for c in range(num_classes):
            if roots:
                objective = (weights[:, c] * log_probs[:, c]).sum()
                torch.autograd.grad(objective, roots, retain_graph=c < num_classes - 1, allow_unused=True)
            finish_pass()
        return labels
    if fisher_type == "true":
        labels = sampled_token_labels(logits, labels, seed, first_index, shift)
    if roots:
        objective = sample_log_likelihoods(logits, labels, shift).sum()
        torch.autograd.grad(objective, roots, allow_unused=True)
    finish_pass()
    return labels


def sample_objectives(logits: torch.Tensor, labels: torch.Tensor, fisher_type: str, shift: bool) -> list[torch.Tensor]:
    """The terms whose squared gradients sum to one sample's Fisher (one, or one per class for the true
    Fisher of a classifier, scaled by `sqrt(p(c|x))`)."""
    if fisher_type == "true" and logits.dim() == 2:
        log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
        weights = log_probs.detach().exp().sqrt()
        return [weights[c] * log_probs[c] for c in range(log_probs.shape[0])]
    return [sample_log_likelihoods(logits, labels, shift).sum()]


def prepare_decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> bool:
    """Encoder-decoder models: the decoder reads the labels shifted right, and logits at t predict label t. Adds
    `decoder_input_ids` to `batch` in place where it has no decoder inputs.

    Returns:
        `shift`: whether token-level logits at t predict the label at t + 1 (a causal LM), not at t.
    """
    config = getattr(model, "config", None)
    shift = not getattr(config, "is_encoder_decoder", False)
    if shift or "decoder_input_ids" in batch or "decoder_inputs_embeds" in batch:
        return shift
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise DeepCleanError(
            f"Fisher: {type(model).__name__} is an encoder-decoder model that cannot build decoder inputs "
            "from labels; expected batches with `decoder_input_ids`."
        )
    batch["decoder_input_ids"] = prepare(labels=labels)
    return shift
