"""The masked repair: train only the reset elements on retain rows, watched by a monitor that can stop it early once
retain accuracy (a classifier) or retain perplexity (a language model) is back."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from ..data.collators import subsample
from ..evaluation.causal_lm import causal_lm_split_metrics, compute_sequence_outputs
from ..evaluation.metrics import compute_sample_outputs, membership_inference_auc, preserved_random_state
from .training import train_model


def repair_selected_weights(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    dataloader: DataLoader,
    accelerator: Accelerator,
    *,
    epochs: float,
    learning_rate: float,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    lr_scheduler_type: str = "linear",
    max_grad_norm: float = 1.0,
    should_stop: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """Fine-tune only the selected elements on retained data; every other element stays bit-for-bit equal.

    `should_stop` (e.g. a `RepairMonitor`) is asked after every step whether to end the repair early.
    """
    return train_model(
        model,
        dataloader,
        accelerator,
        epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        lr_scheduler_type=lr_scheduler_type,
        max_grad_norm=max_grad_norm,
        masks=masks,
        should_stop=should_stop,
        desc="Repair",
    )


class RepairMonitor:
    """Early stopping of the repair: stop once the model is repaired on retain rows and, optionally, the forget rows
    look held out.

    Every `check_every` steps the model is evaluated on small fixed samples of the forget, retain and held-out
    rows. The repair counts as done on retain rows when
    - a classifier's retain accuracy is >= `target_retain_accuracy` (the original model's, less a tolerance), or
    - a language model's retain perplexity (token-weighted, as `causal_lm_split_metrics` measures it) is
      <= `target_retain_perplexity` (the original model's, times one plus a tolerance).
    With `criterion="retain"` that alone ends the repair: the model is repaired no further than the original was
    trained. With `criterion="retain_and_mia"` the loss attack must also no longer tell forget rows from held-out
    rows better than chance: `mia_auc(forget vs held-out) <= 0.5 + auc_margin` (a sequence's mean token loss for a
    language model). The repair on retain rows pulls forget rows that resemble retain rows back towards "member",
    so stopping as soon as the model is repaired keeps what the reset forgot.

    A check leaves the global random state as it found it, and under several processes every process reads the
    same gathered outputs, so every process stops at the same step.

    Args:
        model: the model being repaired.
        dataloaders: loaders of the monitoring samples: `retain`, plus `forget` and `test` for `retain_and_mia`.
        accelerator: the run's Accelerator.
        target_retain_accuracy: a classifier's retain accuracy that counts as recovered.
        target_retain_perplexity: a language model's retain perplexity that counts as recovered (give one target).
        check_every: steps between checks.
        auc_margin: tolerance of the attack criterion.
        criterion: `retain_and_mia` or `retain` (see above).
    """

    def __init__(
        self,
        model: nn.Module,
        dataloaders: Mapping[str, DataLoader],
        accelerator: Accelerator,
        *,
        target_retain_accuracy: float | None = None,
        target_retain_perplexity: float | None = None,
        check_every: int,
        auc_margin: float = 0.05,
        criterion: str = "retain",
    ):
        if (target_retain_accuracy is None) == (target_retain_perplexity is None):
            raise TypeError("RepairMonitor: give exactly one of target_retain_accuracy and target_retain_perplexity.")
        self.model = model
        self.dataloaders = dataloaders
        self.accelerator = accelerator
        self.target_retain_accuracy = target_retain_accuracy
        self.target_retain_perplexity = target_retain_perplexity
        self.language_model = target_retain_perplexity is not None
        self.check_every = max(1, check_every)
        self.auc_margin = auc_margin
        self.criterion = criterion
        # every check: its step and what it measured
        self.history: list[dict[str, float]] = []

    @property
    def target(self) -> float:
        """The retain accuracy (at least) or perplexity (at most) that counts as recovered."""
        return self.target_retain_perplexity if self.language_model else self.target_retain_accuracy

    def __call__(self, step: int) -> bool:
        if step % self.check_every:
            return False
        outputs = {
            split: monitor_outputs(self.model, loader, self.accelerator, self.language_model, f"Monitor {split}")
            for split, loader in self.dataloaders.items()
        }
        if self.language_model:
            measured = {"retain_perplexity": retain_perplexity(outputs["retain"])}
            recovered = measured["retain_perplexity"] <= self.target_retain_perplexity
        else:
            measured = {"retain_accuracy": float(outputs["retain"]["correct"].mean())}
            recovered = measured["retain_accuracy"] >= self.target_retain_accuracy
        if self.criterion == "retain_and_mia":
            forget, test = (outputs[split]["loss"] for split in ("forget", "test"))
            # a sequence without predicted tokens has no loss (NaN) and carries no signal
            measured["mia_auc"] = membership_inference_auc(forget[np.isfinite(forget)], test[np.isfinite(test)])
            recovered = recovered and measured["mia_auc"] <= 0.5 + self.auc_margin
        self.history.append({"step": step, **measured})
        return recovered


def monitor_outputs(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, language_model: bool, desc: str
) -> dict[str, np.ndarray]:
    """Per-sample outputs of a classifier (`compute_sample_outputs`) or per-sequence ones of a language model
    (`compute_sequence_outputs`), leaving the global random state as it was."""
    if not language_model:
        return compute_sample_outputs(model, loader, accelerator, desc=desc)  # keeps the random state itself
    with preserved_random_state(accelerator):
        return compute_sequence_outputs(model, loader, accelerator, desc=desc)


def retain_perplexity(outputs: Mapping[str, np.ndarray]) -> float:
    """Token-weighted perplexity of per-sequence outputs, as the run's evaluation reports `retain_perplexity`."""
    return causal_lm_split_metrics("retain", outputs)["retain_perplexity"]


MONITOR_ROWS = 256


def build_repair_monitor(
    model: nn.Module,
    *,
    original_model: nn.Module,
    rows: Mapping[str, Dataset],
    loader: Callable[[Dataset], DataLoader],
    accelerator: Accelerator,
    tolerance: float,
    steps_per_epoch: int,
    seed: int,
    criterion: str = "retain",
    language_model: bool = False,
    perplexity_tolerance: float = 0.0,
) -> RepairMonitor:
    """A `RepairMonitor` on seeded samples of at most 256 forget/retain/held-out rows, checking 4 times an epoch.

    The recovery target is measured on the original model's retain sample: its accuracy less `tolerance` for a
    classifier, its perplexity times `1 + perplexity_tolerance` for a language model.

    Args:
        model: the model being repaired.
        original_model: the model before the reset.
        rows: `retain` rows, plus `forget` and `test` rows for `retain_and_mia`.
        loader: makes an (unshuffled) dataloader of a dataset.
        accelerator: the run's Accelerator.
        tolerance: how far below the original's retain accuracy still counts as recovered (classifiers).
        steps_per_epoch: repair steps per epoch.
        seed: seed of the samples.
        criterion: what ends the repair (`RepairMonitor`).
        language_model: the model is a causal or sequence-to-sequence language model: watch retain perplexity.
        perplexity_tolerance: how far above the original's retain perplexity, relatively, still counts as
            recovered (language models).
    """
    loaders = {split: loader(subsample(dataset, MONITOR_ROWS, seed)) for split, dataset in rows.items()}
    original = monitor_outputs(original_model, loaders["retain"], accelerator, language_model, "Monitor retain")
    if language_model:
        target = {"target_retain_perplexity": retain_perplexity(original) * (1.0 + perplexity_tolerance)}
    else:
        target = {"target_retain_accuracy": float(original["correct"].mean()) - tolerance}
    return RepairMonitor(
        model, loaders, accelerator, **target, check_every=max(1, steps_per_epoch // 4), criterion=criterion
    )
