"""How well was the data forgotten? Accuracy and loss per split, membership inference, gap to a reference.

Metric names are `{split}_{metric}`:
- `forget_accuracy`, `retain_accuracy`, `test_accuracy` and the matching `*_loss` (mean per-sample loss);
- `mia_auc`: AUC of a loss-threshold attack telling forget samples (members) from held-out test samples
  (non-members): a lower loss means "member". Around 0.5 when forget samples look like unseen data;
- `mia_efficacy`: a logistic-regression attack on per-sample (loss, entropy, max-prob) features, trained on
  retain (members) vs test (non-members) samples and applied to the forget set; the share of forget samples
  predicted "non-member". Higher means the forget set looks less like training data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..distributed import transient_preparations
from ..records import GAP_METRICS


SPLITS = ("forget", "retain", "test")


@torch.no_grad()
def compute_sample_outputs(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator, desc: str = "Evaluate"
) -> dict[str, np.ndarray]:
    """Per-sample loss, correctness, predictive entropy and max probability of a classifier.

    The dataloader is sharded across processes by Accelerate and the outputs gathered with
    `gather_for_metrics`, so every process gets each sample exactly once (the padding Accelerate adds to even out
    the last batch is dropped).

    Args:
        model: the classifier (possibly wrapped by `accelerator.prepare`).
        dataloader: a plain (unprepared) DataLoader of dict batches with `labels`.
        accelerator: the run's Accelerator.
        desc: progress-bar label.

    Returns:
        `{"loss", "correct", "entropy", "max_prob"}`, one float entry per sample of the whole dataset.

    The global random state is left as it was (`preserved_random_state`): the repair's early-stopping monitor
    measures between training steps, and measuring must not change the repair. Nothing prepared here stays with
    the Accelerator.
    """
    model.eval()
    columns: dict[str, list[torch.Tensor]] = {"loss": [], "correct": [], "entropy": [], "max_prob": []}
    with transient_preparations(accelerator), preserved_random_state(accelerator):
        loader = accelerator.prepare_data_loader(dataloader, device_placement=True)
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            probs = log_probs.exp()
            values = {
                "loss": -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                "correct": (logits.argmax(-1) == labels).float(),
                "entropy": -(probs * log_probs).sum(-1),
                "max_prob": probs.max(-1).values,
            }
            for key, value in accelerator.gather_for_metrics(values).items():
                columns[key].append(value.cpu())
    return {key: torch.cat(parts).numpy() if parts else np.zeros(0) for key, parts in columns.items()}


def preserved_random_state(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """A block after which the global random state (the CPU generator's, and on CUDA the run's device's) is as it was
    before: measuring must not change what a training draws after it."""
    return torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else [])


def split_metrics(split: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`{split}_accuracy` and `{split}_loss` from per-sample outputs."""
    return {f"{split}_accuracy": float(np.mean(outputs["correct"])), f"{split}_loss": float(np.mean(outputs["loss"]))}


def membership_inference_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold attack: score = -loss, label 1 for members."""
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    scores = -np.concatenate([member_losses, nonmember_losses])
    return float(roc_auc_score(labels, scores))


def _attack_features(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([outputs["loss"], outputs["entropy"], outputs["max_prob"]], axis=1)


def membership_inference_efficacy(
    retain: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], forget: Mapping[str, np.ndarray]
) -> float:
    """Share of forget samples a retain-vs-test logistic-regression attack calls non-members.

    Classes are balanced by weight, since the retain set is usually much larger than the test set.
    """
    features = np.concatenate([_attack_features(retain), _attack_features(test)])
    labels = np.concatenate([np.ones(len(retain["loss"])), np.zeros(len(test["loss"]))])
    attack = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    attack.fit(features, labels)
    predictions = attack.predict(_attack_features(forget))
    return float(np.mean(predictions == 0))


def evaluate_splits(
    compute_outputs: Callable[..., dict[str, np.ndarray]],
    metrics_of_split: Callable[[str, Mapping[str, np.ndarray]], dict[str, float]],
    model: nn.Module,
    dataloaders: Mapping[str, DataLoader],
    accelerator: Accelerator,
    prefix: str = "",
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Per-sample outputs of every loader (`compute_outputs(model, loader, accelerator, desc=...)`), and the metrics
    `metrics_of_split(split, outputs)` of the forget, retain and test splits among them.

    The global random state is left as it was: each DataLoader iteration draws a seed from it, and the repair's
    dropout draws from it after, so measuring more (canaries, say) must not change the cleaned weights.
    """
    with preserved_random_state(accelerator):
        outputs = {
            split: compute_outputs(model, loader, accelerator, desc=f"{prefix}{split}".strip())
            for split, loader in dataloaders.items()
        }
    metrics: dict[str, float] = {}
    for split in SPLITS:
        if split in outputs:
            metrics.update(metrics_of_split(split, outputs[split]))
    return outputs, metrics


def evaluate_unlearning(
    model: nn.Module,
    dataloaders: Mapping[str, DataLoader],
    accelerator: Accelerator,
    prefix: str = "",
    return_outputs: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Accuracy and loss on every split given, and both attacks when a `test` loader is given.

    Args:
        model: the classifier to evaluate.
        dataloaders: `{"forget": ..., "retain": ..., "test": ...}` (test optional).
        accelerator: the run's Accelerator.
        prefix: progress-bar label prefix.
        return_outputs: also return the per-sample outputs (for the card's loss plots).

    Returns:
        `{split}_accuracy` and `{split}_loss` per split, plus `mia_auc` and `mia_efficacy` with a test split;
        with `return_outputs`, the tuple `(metrics, {split: compute_sample_outputs(...)})`.
    """
    outputs, metrics = evaluate_splits(compute_sample_outputs, split_metrics, model, dataloaders, accelerator, prefix)
    if "test" in outputs and len(outputs["test"]["loss"]) and len(outputs["forget"]["loss"]):
        metrics["mia_auc"] = membership_inference_auc(outputs["forget"]["loss"], outputs["test"]["loss"])
        metrics["mia_efficacy"] = membership_inference_efficacy(outputs["retain"], outputs["test"], outputs["forget"])
    return (metrics, outputs) if return_outputs else metrics


def average_gap(metrics: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean absolute difference, in percentage points, of forget/retain/test accuracy and mia_efficacy."""
    keys = [key for key in GAP_METRICS if key in metrics and key in reference]
    if not keys:
        return float("nan")
    return float(np.mean([abs(metrics[key] - reference[key]) * 100 for key in keys]))


def compare_to_reference(metrics: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per-metric differences to a reference (usually retrained) model, and `avg_gap`.

    Args:
        metrics: the metrics of the model under test (`evaluate_unlearning` output).
        reference: the same metrics of the reference model.

    Returns:
        `{"{metric}_diff": metrics - reference}` for every metric both have (signed, in the metric's own unit),
        plus `avg_gap` (percentage points, see `average_gap`) where both have its accuracy metrics (not for causal
        LMs, which have perplexities).
    """
    comparison = {f"{key}_diff": float(metrics[key] - reference[key]) for key in metrics if key in reference}
    if any(key in metrics and key in reference for key in GAP_METRICS):
        comparison["avg_gap"] = average_gap(metrics, reference)
    return comparison


def gap_closed(avg_gap: float, original_avg_gap: float) -> float:
    """`1 - avg_gap / original_avg_gap`: the share of the original model's gap to the reference that a method closed.

    1 means the method matches the reference, 0 that it is as far away as doing nothing, negative that it moved
    further away. NaN when the original has no gap to close.
    """
    if not original_avg_gap or not np.isfinite(original_avg_gap):
        return float("nan")
    return float(1.0 - avg_gap / original_avg_gap)
