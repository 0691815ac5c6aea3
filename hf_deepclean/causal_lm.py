"""Causal language models: the text collator, per-sequence outputs, and the metrics of DESIGN §6 for LMs.

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
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .distributed import transient_preparations
from .errors import DeepCleanError
from .evaluation import evaluate_splits, membership_inference_auc


MIN_K_FRACTION = 0.2


class CausalLMCollator:
    """Tokenise texts at batch time: truncation to `max_length`, right padding, labels -100 on padding.

    The pad id is the tokenizer's pad token, else its end-of-sequence token (GPT-2 and Llama tokenizers have no
    pad token). Padding positions have attention mask 0 and label -100, so the pad id itself never matters.
    Padding is done here, on the right, whatever the tokenizer's `padding_side`: the Fisher engine skips trailing
    padding, and positions then match between a sequence alone and in a batch.
    """

    def __init__(self, tokenizer, text_column: str, max_length: int | None = None):
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DeepCleanError(
                "--model_name_or_path: the tokenizer has neither a pad nor an end-of-sequence token; expected one of "
                "them for padding causal-LM batches."
            )
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.max_length = max_length
        self.pad_id = int(pad_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [row[self.text_column] for row in rows]
        encoded = self.tokenizer(texts, truncation=self.max_length is not None, max_length=self.max_length)
        sequences = encoded["input_ids"]
        width = max(1, max(len(ids) for ids in sequences))
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for n, ids in enumerate(sequences):
            input_ids[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[n, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every predicted token: logits at t predict the label at t + 1.

    Returns:
        `(log_probs, valid)`, both `[N, T - 1]`; `log_probs` is 0 where `valid` is False (label -100).
    """
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
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
    """Per-sequence negative log-likelihood, token count, mean token loss and Min-K% score of a causal LM.

    The dataloader is sharded across processes by Accelerate and the outputs gathered with `gather_for_metrics`,
    so every process gets each sequence exactly once.

    Returns:
        `{"nll", "tokens", "loss", "min_k"}`, one entry per sequence of the whole dataset (`loss` = nll / tokens;
        `loss` and `min_k` are NaN for a sequence without predicted tokens).
    """
    model.eval()
    columns: dict[str, list[torch.Tensor]] = {"nll": [], "tokens": [], "loss": [], "min_k": []}
    with transient_preparations(accelerator):
        loader = accelerator.prepare_data_loader(dataloader, device_placement=True)
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            labels = batch.pop("labels")
            log_probs, valid = token_log_likelihoods(model(**batch).logits, labels)
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


@dataclass(frozen=True)
class Canaries:
    """Secret strings planted in the training data, and never-seen references of the same format.

    Attributes:
        texts: every canary, in file order.
        planted: `True` for the canaries that were in the training data.
        sha256: SHA-256 of the file's bytes (what reports record: never the texts).
    """

    texts: tuple[str, ...]
    planted: tuple[bool, ...]
    sha256: str

    @property
    def num_planted(self) -> int:
        return sum(self.planted)

    @property
    def num_references(self) -> int:
        return len(self.planted) - self.num_planted

    def dataset(self, text_column: str) -> Dataset:
        """The canaries as rows of `text_column`, for the run's collator."""
        return Dataset.from_dict({text_column: list(self.texts)})

    def record(self) -> dict[str, Any]:
        return {"planted": self.num_planted, "references": self.num_references, "sha256": self.sha256}


def load_canaries(path: str) -> Canaries:
    """Read a canary file: JSON lines, one object per canary, `{"text": str, "planted": bool}`.

    At least one planted canary and two never-seen ones are needed (each never-seen canary is ranked among the
    others to give the never-seen level). Error messages give line numbers, never the text of a canary.

    Raises:
        DeepCleanError: naming --canaries, for an unreadable or malformed file.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DeepCleanError(f"--canaries: cannot read {path!r} ({type(error).__name__}).") from None
    texts, planted = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("text"), str)
            or not entry["text"].strip()
            or not isinstance(entry.get("planted"), bool)
        ):
            raise DeepCleanError(
                f"--canaries: line {number} of {path!r} is not a JSON object with a non-empty string `text` and a "
                'boolean `planted`; expected JSON lines such as {"text": "my PIN is 4 8 1 9 2 7", "planted": true}.'
            )
        texts.append(entry["text"])
        planted.append(entry["planted"])
    canaries = Canaries(tuple(texts), tuple(planted), hashlib.sha256(raw).hexdigest())
    if canaries.num_planted < 1 or canaries.num_references < 2:
        raise DeepCleanError(
            f"--canaries: {path!r} has {canaries.num_planted} planted and {canaries.num_references} never-seen "
            "canaries; expected at least 1 planted and 2 never-seen ones."
        )
    return canaries


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
