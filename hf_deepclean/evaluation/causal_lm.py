"""Causal language models: per-sequence outputs and the metrics for language models.

A sample is one sequence (one row of the text column), truncated to `max_length` tokens and padded on the right;
labels are the input ids with -100 on padding, so the model's own shifted loss, the Fisher engine
(`log p(x_n) = sum of the sequence's token log-probs`) and the metrics here all see the same tokens.

Metrics (names `{split}_{metric}`):
- `{split}_loss`: mean negative log-likelihood per predicted token over the split (token-weighted, so a long
  document counts by its tokens), and `{split}_perplexity = exp({split}_loss)`;
- `mia_auc`: AUC of a loss attack telling forget sequences (members) from held-out ones: the score is a
  sequence's mean token loss, lower meaning "member";
- `mia_min_k_auc`: the same with the Min-K% Prob score of Shi et al. 2023 ("Detecting Pretraining Data from Large
  Language Models"): the mean of the k% lowest token log-probabilities of a sequence (k = 20% by default, at least
  one token), higher meaning "member";
- with canaries (`--canaries`), the exposure of Carlini et al. 2019 ("The Secret Sharer"), see `canary_metrics`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.canaries import Canaries
from ..distributed import transient_preparations
from ..errors import DeepCleanError
from .metrics import evaluate_splits, membership_inference_auc


MIN_K_FRACTION = 0.2


def token_log_likelihoods(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every predicted token: logits at t predict the label at t + 1 (a causal LM), or the label
    at t with `shift=False` (an encoder-decoder, whose decoder inputs are the labels shifted right).

    Returns:
        `(log_probs, valid)`, both `[N, T - 1]` (`[N, T]` without shift); `log_probs` is 0 where `valid` is False
        (label -100).
    """
    targets = labels[:, 1:] if shift else labels
    valid = targets != -100
    log_probs = torch.log_softmax((logits[:, :-1] if shift else logits).float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~valid, 0.0), valid


def min_k_scores(log_probs: torch.Tensor, valid: torch.Tensor, k: float = MIN_K_FRACTION) -> torch.Tensor:
    """Min-K% Prob per sequence: mean of its `max(1, floor(k * tokens))` lowest token log-probabilities.

    NaN for a sequence without predicted tokens.
    """
    tokens = valid.sum(-1)
    ordered = log_probs.masked_fill(~valid, math.inf).sort(dim=-1).values
    count = torch.clamp(torch.floor(k * tokens).long(), min=1)
    keep = torch.arange(ordered.shape[-1], device=ordered.device).unsqueeze(0) < count.unsqueeze(-1)
    total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(-1)
    return torch.where(tokens > 0, total / count, torch.full_like(total, math.nan))


@torch.no_grad()
def compute_sequence_outputs(
    model: nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    desc: str = "Evaluate",
    k: float = MIN_K_FRACTION,
) -> dict[str, np.ndarray]:
    """Per-sequence negative log-likelihood, token count, mean token loss and Min-K% score of a causal LM (or of
    an encoder-decoder's target tokens).

    The dataloader is sharded across processes by Accelerate and the outputs gathered with `gather_for_metrics`,
    so every process gets each sequence exactly once.

    Returns:
        `{"nll", "tokens", "loss", "min_k"}`, one entry per sequence of the whole dataset (`loss` = nll / tokens;
        `loss` and `min_k` are NaN for a sequence without predicted tokens).
    """
    model.eval()
    config = getattr(accelerator.unwrap_model(model), "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    columns: dict[str, list[torch.Tensor]] = {"nll": [], "tokens": [], "loss": [], "min_k": []}
    with transient_preparations(accelerator):
        loader = accelerator.prepare_data_loader(dataloader, device_placement=True)
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            labels = batch.pop("labels")
            # an encoder-decoder builds its decoder inputs from the labels (shifted right); a causal LM reads the text
            logits = model(**batch, labels=labels).logits if encoder_decoder else model(**batch).logits
            log_probs, valid = token_log_likelihoods(logits, labels, shift=not encoder_decoder)
            tokens = valid.sum(-1)
            nll = -log_probs.sum(-1)
            values = {
                "nll": nll,
                "tokens": tokens.float(),
                "loss": torch.where(tokens > 0, nll / tokens.clamp(min=1), torch.full_like(nll, math.nan)),
                "min_k": min_k_scores(log_probs, valid, k),
            }
            for key, value in accelerator.gather_for_metrics(values).items():
                columns[key].append(value.cpu())
    return {key: torch.cat(parts).double().numpy() if parts else np.zeros(0) for key, parts in columns.items()}


def causal_lm_split_metrics(split: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`{split}_loss` (mean NLL per predicted token over the split) and `{split}_perplexity` (its exponential)."""
    tokens = float(np.sum(outputs["tokens"]))
    loss = float(np.sum(outputs["nll"]) / tokens) if tokens else math.nan
    return {f"{split}_loss": loss, f"{split}_perplexity": math.exp(loss) if math.isfinite(loss) else math.nan}


def sequence_attack_aucs(forget: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`mia_auc` (mean token loss) and `mia_min_k_auc` (Min-K% Prob) of forget (members) vs test sequences.

    Sequences without predicted tokens carry no signal and are left out.
    """
    metrics = {}
    for name, key, sign in (("mia_auc", "loss", 1.0), ("mia_min_k_auc", "min_k", -1.0)):
        members, nonmembers = (values[key][np.isfinite(values[key])] for values in (forget, test))
        if len(members) and len(nonmembers):
            # membership_inference_auc calls a lower value "member"; a higher Min-K% score means "member"
            metrics[name] = membership_inference_auc(sign * members, sign * nonmembers)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Canaries (Carlini et al. 2019)
# --------------------------------------------------------------------------------------------------------------


def canary_ranks(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Rank of each score among `references` plus itself, lowest first (1 = lower than every reference).

    Ties with references count half, so a model that cannot tell candidates apart does not rank canaries first.
    """
    scores, references = np.asarray(scores, np.float64), np.sort(np.asarray(references, np.float64))
    lower = np.searchsorted(references, scores, side="left")
    equal = np.searchsorted(references, scores, side="right") - lower
    return 1.0 + lower + 0.5 * equal


def exposure(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Exposure of Carlini et al. 2019: `log2 |R| - log2 rank`, per canary.

    Here `R` is the canary together with the never-seen `references` (`|R| = len(references) + 1`) and the rank is
    by log-perplexity (`canary_ranks`): the rank-based estimate, exact for the sampled candidate set. It lies
    between 0 and `log2 |R|`, reached by a canary less perplexing than every reference. (The paper's estimate for
    the whole space of possible secrets extrapolates from a fitted distribution; with the few references of a
    canary file the rank among them is the honest figure, and `log2 |R|` bounds what can be shown.)

    Args:
        scores: log-perplexity (negative log-likelihood) of each canary.
        references: log-perplexity of the never-seen canaries.
    """
    return math.log2(len(references) + 1) - np.log2(canary_ranks(scores, references))


def canary_metrics(log_perplexity: np.ndarray, planted: np.ndarray) -> dict[str, float]:
    """Exposure of the planted canaries, and the never-seen level to compare it with.

    Returns:
        - `canary_exposure`: mean exposure of the planted canaries, ranked among all never-seen ones;
        - `canary_exposure_unseen`: mean exposure of each never-seen canary ranked among the other never-seen ones
          (leave one out): what a canary the model never saw scores, about `log2 e = 1.44` bits for many
          references;
        - `canary_exposure_max`: `log2(references + 1)`, the largest exposure the references can show;
        - `canary_planted`, `canary_references`: the counts.
    """
    log_perplexity, planted = np.asarray(log_perplexity, np.float64), np.asarray(planted, bool)
    references = log_perplexity[~planted]
    unseen = [exposure(references[j : j + 1], np.delete(references, j))[0] for j in range(len(references))]
    return {
        "canary_exposure": float(np.mean(exposure(log_perplexity[planted], references))),
        "canary_exposure_unseen": float(np.mean(unseen)),
        "canary_exposure_max": math.log2(len(references) + 1),
        "canary_planted": int(planted.sum()),
        "canary_references": len(references),
    }


def evaluate_causal_lm(
    model: nn.Module,
    dataloaders: Mapping[str, DataLoader],
    accelerator: Accelerator,
    prefix: str = "",
    return_outputs: bool = False,
    canaries: Canaries | None = None,
    min_k_fraction: float = MIN_K_FRACTION,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Loss and perplexity per split, both attacks with a `test` loader, and exposure with a `canaries` loader.

    Args:
        model: the causal LM to evaluate.
        dataloaders: `{"forget", "retain", "test", "canaries"}` loaders (test and canaries optional); the canary
            loader must not shuffle (its order is that of `canaries`).
        accelerator: the run's Accelerator.
        prefix: progress-bar label prefix.
        return_outputs: also return the per-sequence outputs of the splits (not of the canaries).
        canaries: the canary file's content, needed with a `canaries` loader.
        min_k_fraction: k of the Min-K% Prob attack.

    Returns:
        The metrics (see the module docstring); with `return_outputs`, `(metrics, {split: outputs})`.
    """
    compute = functools.partial(compute_sequence_outputs, k=min_k_fraction)
    outputs, metrics = evaluate_splits(compute, causal_lm_split_metrics, model, dataloaders, accelerator, prefix)
    if "test" in outputs and "forget" in outputs:
        metrics.update(sequence_attack_aucs(outputs["forget"], outputs["test"]))
    if "canaries" in outputs:
        scored = outputs.pop("canaries")
        empty = int(np.sum(np.asarray(scored["tokens"]) == 0))
        if empty:  # nothing to score: its loss of 0 would rank it as the most exposed canary
            raise DeepCleanError(
                f"--canaries: {empty} canaries have fewer than 2 tokens after tokenization; expected texts of at "
                "least 2 tokens (one to condition on, one to score)."
            )
        metrics.update(canary_metrics(scored["nll"], np.array(canaries.planted)))
    return (metrics, outputs) if return_outputs else metrics
