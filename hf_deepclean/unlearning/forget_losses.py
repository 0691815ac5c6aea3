"""Losses on the rows to forget: the forget term of DeepClean's forget-ascent repair (`--forget_loss`), and the
preference losses of the causal-LM baselines (NPO, SimNPO) that share them.

A forget term is a callable `(model, batch) -> loss to minimise`, added with weight `w = --forget_ascent_weight` to
the retain loss of every repair step:

- `ascent`: `-L_f`, the model's own loss on the forget rows, ascended (unbounded: its gradient never fades).
- `simnpo`: SimNPO's forget loss (Fan et al. 2024), `-(2 / beta) mean log sigmoid(-(beta / |y|) log p(y) - gamma)`
  over rows, `log p(y)` a row's log-likelihood of its labels and `|y|` their count (1 for a classifier's label). It
  is bounded below by 0 and a row's pull on `log p(y) / |y|` is `2 sigmoid((beta / |y|) log p(y) + gamma)`, which
  fades as its likelihood falls: a language model's forgotten rows stop pulling. A classifier's label (`|y| = 1`)
  still pulls at 0.3 where a binary label flips (p = 0.5), so there it overshoots as ascent does (docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FORGET_LOSSES
from ..errors import DeepCleanError
from ..evaluation.causal_lm import token_log_likelihoods


SIMNPO_BETA = 2.5  # SimNPO's inverse temperature (Fan et al. 2024, their TOFU setting)
SIMNPO_GAMMA = 0.0  # its reward margin

ForgetTerm = Callable[[nn.Module, dict], torch.Tensor]


def sequence_log_likelihoods(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log p(y), |y|)` per row: for a language model (`[N, T, V]` logits) the sum of its predicted tokens'
    log-probabilities (labels shifted by one for a causal LM, not for an encoder-decoder; -100 left out) and their
    count; for a classifier (`[N, C]` logits, `[N]` labels) the log-probability of the label, and 1."""
    if logits.dim() == 2:  # a classifier: its label as a sequence of one token
        logits, labels, shift = logits.unsqueeze(1), labels.unsqueeze(1), False
    log_probs, valid = token_log_likelihoods(logits, labels, shift=shift)
    return log_probs.sum(-1), valid.sum(-1)


def npo_loss(log_likelihoods: torch.Tensor, reference_log_likelihoods: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO's forget loss: `-(2 / beta) mean log sigmoid(-beta (log p_theta(y) - log p_ref(y)))` over sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (log_likelihoods - reference_log_likelihoods)).mean()


def simnpo_loss(log_likelihoods: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO's forget loss: `-(2 / beta) mean log sigmoid(-(beta / |y|) log p_theta(y) - gamma)` over sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * log_likelihoods / lengths.clamp(min=1) - gamma).mean()


def ascent_term(model: nn.Module, batch: dict) -> torch.Tensor:
    """`-L_f`: the model's loss on the batch, to ascend."""
    return -model(**batch).loss


def simnpo_term(model: nn.Module, batch: dict) -> torch.Tensor:
    """SimNPO's forget loss of the batch (`SIMNPO_BETA`, `SIMNPO_GAMMA`), from the model's logits and the labels."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    config = getattr(getattr(model, "module", model), "config", None)  # through a DDP wrapper
    shift = not getattr(config, "is_encoder_decoder", False)
    log_likelihoods, lengths = sequence_log_likelihoods(model(**inputs).logits, batch["labels"], shift=shift)
    return simnpo_loss(log_likelihoods, lengths, SIMNPO_BETA, SIMNPO_GAMMA)


FORGET_TERMS: dict[str, ForgetTerm] = {"ascent": ascent_term, "simnpo": simnpo_term}  # by `FORGET_LOSSES` name


def forget_term(name: str) -> ForgetTerm:
    """The forget term called `name` (`FORGET_LOSSES`)."""
    if name not in FORGET_TERMS:
        raise DeepCleanError(f"--forget_loss: got {name!r}; expected one of {', '.join(FORGET_LOSSES)}.")
    return FORGET_TERMS[name]
