"""The repair's learning rate: a short probe of a few candidate rates on the reset model, or the configured rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn
from torch.utils.data import DataLoader

from ..distributed import transient_preparations
from ..evaluation.metrics import preserved_random_state
from .training import optimizer_steps_per_epoch, train_model


logger = get_logger(__name__)


if TYPE_CHECKING:
    from ..config import DeepCleanConfig


# the repair rates `probe_learning_rate` tries, largest first: half-decades from the rate a model trained from scratch
# was trained at (3e-3 for the digits ViT, which the probe picks there: with 1e-3 as the largest candidate it picked
# that in every digits run) down to the rates pretrained encoders are fine-tuned with
LEARNING_RATE_CANDIDATES = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)


PROBE_STEPS = 10


PROBE_EVAL_ROWS = 256  # retain rows the probe measures each trial's loss on


PROBE_TOLERANCE = 0.02  # losses within 2% are a tie, which the smaller rate wins


def probe_learning_rate(
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    accelerator: Accelerator,
    *,
    candidates: Sequence[float] = LEARNING_RATE_CANDIDATES,
    steps: int = PROBE_STEPS,
    masks: Mapping[str, torch.Tensor] | None = None,
    tolerance: float = PROBE_TOLERANCE,
    **optimizer_arguments,
) -> tuple[float, dict[float, float]]:
    """Choose a learning rate by a short trial of each candidate from the same weights (a learning-rate probe).

    Each trial trains `steps` optimizer steps at a constant rate with `train_model` (same masks, data order and
    seed), measures the mean loss on `eval_dataloader`, and puts the weights back. Trials run from the largest rate
    down. A rate whose loss is within `tolerance` (relative) of the lowest loss so far becomes the choice: a tie
    goes to the smaller rate, which is the safer one over a repair much longer than the trial. The sweep stops at
    the first rate that is worse than that by more than `tolerance` (the loss after a fixed number of steps is
    U-shaped in log learning rate), so a model that clearly takes the largest rate costs two trials. A trial whose
    loss is not finite (divergence) counts as infinitely bad.

    Args:
        model: the model as `train_model` takes it; it comes back with the weights and buffers it had.
        train_dataloader: a plain DataLoader of the training rows (the first `steps` batches are used).
        eval_dataloader: a plain DataLoader of the rows the loss is measured on.
        accelerator: the run's Accelerator.
        candidates: the rates to try, in any order (tried largest first).
        steps: optimizer steps per trial.
        masks: as for `train_model`.
        tolerance: relative difference of losses that counts as a tie.
        optimizer_arguments: other `train_model` arguments (`weight_decay`, `max_grad_norm`); the schedule is
            constant and without warm-up during trials.

    Returns:
        `(chosen rate, {rate: loss})` for the rates tried; the same on every process.
    """
    if not candidates:
        raise ValueError("probe_learning_rate: needs at least one candidate rate.")
    # what a trial can change: every parameter it trains, and buffers (BatchNorm statistics of an unmasked run)
    state = {
        name: value
        for name, value in accelerator.unwrap_model(model).state_dict(keep_vars=True).items()
        if not isinstance(value, nn.Parameter) or value.requires_grad or (masks is not None and name in masks)
    }
    saved = {name: value.detach().clone() for name, value in state.items()}
    generator = getattr(train_dataloader, "generator", None)
    order = generator.get_state() if generator is not None else None

    def restore() -> None:  # the weights, and the data order for the next trial
        with torch.no_grad():
            for name, value in saved.items():
                state[name].copy_(value)
        if generator is not None:
            generator.set_state(order)

    epochs = steps / max(1, optimizer_steps_per_epoch(train_dataloader, accelerator))
    arguments = {**optimizer_arguments, "warmup_ratio": 0.0, "lr_scheduler_type": "constant"}
    losses: dict[float, float] = {}
    chosen, lowest = None, math.inf
    for rate in sorted(set(candidates), reverse=True):
        try:
            # every trial sees the same batches (the restored generator) and the same dropout draws
            with preserved_random_state(accelerator):
                train_model(
                    model,
                    train_dataloader,
                    accelerator,
                    epochs=epochs,
                    learning_rate=rate,
                    masks=masks,
                    desc=f"Probe lr {rate:g}",
                    **arguments,
                )
                loss = losses[rate] = mean_loss(model, eval_dataloader, accelerator)
        finally:
            restore()
        if chosen is not None and not loss <= lowest * (1 + tolerance):
            break
        chosen, lowest = rate, min(lowest, loss)
    return chosen, losses


def choose_repair_learning_rate(
    config: DeepCleanConfig,
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    accelerator: Accelerator,
    masks: Mapping[str, torch.Tensor],
) -> tuple[float | None, dict[float, float] | None]:
    """The rate of DeepClean's repair of the reset elements (`masks`): `config.learning_rate` when set, else the one
    `probe_learning_rate` chooses with the run's optimizer settings (logged).

    Returns:
        `(rate, {rate tried: loss})`; `(config.learning_rate, None)` without a probe, and the rate is `None` when
        nothing is repaired and none was set.
    """
    if config.learning_rate is not None or not config.repair_epochs:
        return config.learning_rate, None
    rate, losses = probe_learning_rate(
        model,
        train_dataloader,
        eval_dataloader,
        accelerator,
        masks=masks,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )
    tried = ", ".join(f"{r:g}: {loss:.4g}" for r, loss in losses.items())
    logger.info(f"Repair learning rate {rate:g} (probe losses {tried}).", main_process_only=True)
    return rate, losses


@torch.no_grad()
def mean_loss(model: nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> float:
    """The model's loss averaged over the batches of `dataloader` (weighted by rows), across processes;
    `inf` when it is not finite."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with transient_preparations(accelerator):
        for batch in accelerator.prepare_data_loader(dataloader, device_placement=True):
            rows = len(batch["labels"])
            total += torch.stack(
                [
                    model(**batch).loss.detach().double() * rows,
                    torch.tensor(rows, dtype=torch.float64, device=total.device),
                ]
            )
    total = accelerator.reduce(total, reduction="sum")
    value = (total[0] / total[1]).item() if total[1] else math.inf
    return value if math.isfinite(value) else math.inf
