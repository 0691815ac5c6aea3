"""The masked repair: train only the reset elements on retain rows, watched by a monitor of forget and retain
loss that can stop it early."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from ..data.collators import subsample
from ..evaluation.metrics import compute_sample_outputs, membership_inference_auc
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
    """Early stopping of the repair: stop once retain accuracy has recovered and the forget rows look held out.

    Every `check_every` steps the model is evaluated on small fixed samples of the forget, retain and held-out
    rows. With `criterion="retain_and_mia"` the repair stops at the first check where both hold:
    - retain accuracy >= `target_retain_accuracy` (the original model's, less a tolerance), and
    - the loss-threshold attack no longer tells forget rows from held-out rows better than chance:
      `mia_auc(forget vs held-out) <= 0.5 + auc_margin`.
    The repair on retain rows pulls forget rows that resemble retain rows back towards "member", so stopping as
    soon as the model is repaired keeps what the reset forgot. With `criterion="retain"` the first condition
    alone ends the repair: the model is repaired no further than the original was trained.

    Args:
        model: the model being repaired.
        dataloaders: loaders of the monitoring samples: `retain`, plus `forget` and `test` for `retain_and_mia`.
        accelerator: the run's Accelerator.
        target_retain_accuracy: retain accuracy that counts as recovered.
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
        target_retain_accuracy: float,
        check_every: int,
        auc_margin: float = 0.05,
        criterion: str = "retain",
    ):
        self.model = model
        self.dataloaders = dataloaders
        self.accelerator = accelerator
        self.target_retain_accuracy = target_retain_accuracy
        self.check_every = max(1, check_every)
        self.auc_margin = auc_margin
        self.criterion = criterion
        self.history: list[dict[str, float]] = []

    def __call__(self, step: int) -> bool:
        if step % self.check_every:
            return False
        outputs = {
            split: compute_sample_outputs(self.model, loader, self.accelerator, desc=f"Monitor {split}")
            for split, loader in self.dataloaders.items()
        }
        retain_accuracy = float(outputs["retain"]["correct"].mean())
        recovered = retain_accuracy >= self.target_retain_accuracy
        if self.criterion == "retain":
            self.history.append({"step": step, "retain_accuracy": retain_accuracy})
            return recovered
        auc = membership_inference_auc(outputs["forget"]["loss"], outputs["test"]["loss"])
        self.history.append({"step": step, "retain_accuracy": retain_accuracy, "mia_auc": auc})
        return recovered and auc <= 0.5 + self.auc_margin


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
) -> RepairMonitor:
    """A `RepairMonitor` on seeded samples of at most 256 forget/retain/held-out rows, checking 4 times an epoch.

    The recovery target is the original model's accuracy on the retain sample, less `tolerance`.

    Args:
        model: the model being repaired.
        original_model: the model before the reset.
        rows: `retain` rows, plus `forget` and `test` rows for `retain_and_mia`.
        loader: makes an (unshuffled) dataloader of a dataset.
        accelerator: the run's Accelerator.
        tolerance: how far below the original's retain accuracy still counts as recovered.
        steps_per_epoch: repair steps per epoch.
        seed: seed of the samples.
        criterion: what ends the repair (`RepairMonitor`).
    """
    loaders = {split: loader(subsample(dataset, MONITOR_ROWS, seed)) for split, dataset in rows.items()}
    original = compute_sample_outputs(original_model, loaders["retain"], accelerator, desc="Monitor retain")
    return RepairMonitor(
        model,
        loaders,
        accelerator,
        target_retain_accuracy=float(original["correct"].mean()) - tolerance,
        check_every=max(1, steps_per_epoch // 4),
        criterion=criterion,
    )
