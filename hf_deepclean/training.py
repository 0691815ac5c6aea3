"""A short supervised training loop on top of Accelerate, with optional element masks.

Used for DeepClean's masked repair and by the demo to train the model it cleans (and its retrained reference).
With `masks`, only the `True` elements of each masked parameter move: gradients are masked (so AdamW's moment
estimates stay zero elsewhere) and, after every optimizer step, the unmasked elements are copied back from an
anchor. The copy makes the invariant exact whatever the optimizer does (decoupled weight decay, momentum,
numerical noise): unselected elements stay bit-for-bit equal to their values before training.

Under several processes the model is wrapped for DDP (through Accelerate) for the loop only: each process takes its
shard of every global batch, gradients are averaged across processes before the optimizer step, so every process
applies the same update to the same weights. With a per-process batch of `B / N` on `N` processes, the global batch
is the `B` rows that one process with batch `B` would use at the same step (same seeded order), so the run matches
a one-process run up to float summation order, with two exceptions: Accelerate completes the last global batch of
an epoch with rows from the epoch's start when the rows do not divide into whole global batches, and a causal LM's
loss is a token mean per process, averaged over processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils.memory import clear_device_cache
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .distributed import transient_preparations
from .evaluation import preserved_random_state


if TYPE_CHECKING:
    from .config import DeepCleanConfig


logger = get_logger(__name__)


def train_model(
    model: nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    *,
    epochs: float,
    learning_rate: float,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    lr_scheduler_type: str = "linear",
    max_grad_norm: float = 1.0,
    masks: Mapping[str, torch.Tensor] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    desc: str = "Train",
) -> dict[str, float]:
    """Train `model` with AdamW for `epochs` passes over `dataloader` (fractions of an epoch allowed).

    Args:
        model: the model, already on `accelerator.device`, as it is or prepared with `evaluation_mode=True` (not
            wrapped for DDP: under several processes the loop wraps it).
        dataloader: a plain (unprepared) DataLoader of dict batches with `labels`; the model returns `.loss`.
            Under several processes each takes its shard of every batch, so pass the per-process batch size.
        accelerator: the run's Accelerator.
        masks: `{parameter name: bool tensor}`; when given, only parameters named here train, and only their
            `True` elements change.
        should_stop: called with the number of steps taken after every optimizer step; training ends early when
            it returns True (early stopping). The model is in train mode again when it returns.

    Returns:
        `{"steps": ..., "final_loss": ..., "stopped_early": ...}` (`final_loss` is `None` when no step was taken).
    """
    with transient_preparations(accelerator):  # nothing this training prepared outlives it
        unwrapped = accelerator.unwrap_model(model)
        named = dict(unwrapped.named_parameters())
        if masks is None:
            trainable = {name: p for name, p in named.items() if p.requires_grad}
        else:
            trainable = {name: named[name] for name, mask in masks.items() if bool(mask.any())}
        dataloader = accelerator.prepare(dataloader)  # each process its shard of every global batch (a DataLoader)
        total_steps = math.ceil(epochs * len(dataloader))
        if total_steps == 0 or not trainable:
            return {"steps": 0, "final_loss": None, "stopped_early": False}

        saved_requires_grad = {name: p.requires_grad for name, p in named.items()}
        saved_attributes = {
            key: unwrapped.__dict__[key]
            for key in ("forward", "_original_forward", "_is_accelerate_prepared")
            if key in unwrapped.__dict__
        }
        hooks, anchors, device_masks = [], {}, {}
        for name, p in named.items():
            p.requires_grad_(name in trainable)
        if masks is not None:
            for name, p in trainable.items():
                mask = masks[name].to(p.device)
                device_masks[name] = mask
                anchors[name] = p.detach().clone()
                # a tensor hook runs before DDP averages the gradient: every process averages masked gradients
                hooks.append(p.register_hook(lambda grad, mask=mask: grad * mask))
        if accelerator.num_processes > 1:
            # DDP over exactly the trainable parameters (those with requires_grad when it is built). Accelerate returns
            # a module it prepared before (for evaluation) unchanged, so its mark is lifted for this preparation.
            unwrapped.__dict__.pop("_is_accelerate_prepared", None)
            model = accelerator.prepare_model(unwrapped)

        optimizer = torch.optim.AdamW(list(trainable.values()), lr=learning_rate, weight_decay=weight_decay)
        # Accelerate's scheduler takes one step per process at every optimizer step (it expects schedules counted in
        # one-process steps) unless batches are split, so the counts are scaled to keep `total_steps` optimizer steps
        scheduler_steps_per_update = 1 if accelerator.split_batches else accelerator.num_processes
        scheduler = get_scheduler(
            lr_scheduler_type,
            optimizer,
            num_warmup_steps=int(warmup_ratio * total_steps) * scheduler_steps_per_update,
            num_training_steps=total_steps * scheduler_steps_per_update,
        )
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        _set_train_mode(unwrapped, frozen_statistics=masks is not None)
        step, loss_value, stopped_early = 0, None, False
        progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
        try:
            while step < total_steps:
                for batch in dataloader:
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if max_grad_norm:
                        accelerator.clip_grad_norm_(list(trainable.values()), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if anchors:
                        with torch.no_grad():
                            for name, anchor in anchors.items():
                                trainable[name].copy_(torch.where(device_masks[name], trainable[name], anchor))
                    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()  # of the global batch
                    step += 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    if should_stop is not None and step < total_steps:
                        stopped_early = bool(should_stop(step))
                        _set_train_mode(unwrapped, frozen_statistics=masks is not None)
                    if step >= total_steps or stopped_early:
                        break
                if stopped_early:
                    break
        finally:
            progress.close()
            for hook in hooks:
                hook.remove()
            for name, p in named.items():
                p.requires_grad_(saved_requires_grad[name])
            # the module as it came: without the second mixed-precision wrapping of `forward` that the DDP preparation added
            unwrapped.__dict__.update(saved_attributes)
            unwrapped.eval()
            release_training(accelerator, optimizer)
        return {"steps": step, "final_loss": loss_value, "stopped_early": stopped_early}


def release_training(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
    """Free what a finished training holds on the device, within a `transient_preparations` block.

    The optimizer's moments (two copies of the trained weights for AdamW) go at once, whatever still refers to the
    optimizer: with a gradient scaler (fp16), Accelerate's wrapper refers to itself and would wait for a garbage
    collection. Under several processes the DDP wrapper is released by Accelerate's `free_memory`, whose full
    garbage collection costs little beside such a run's steps.
    """
    optimizer.state.clear()
    if accelerator.num_processes > 1:
        accelerator.free_memory()
    clear_device_cache()


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


def optimizer_steps_per_epoch(dataloader: DataLoader, accelerator: Accelerator) -> int:
    """Optimizer steps in one epoch over a plain `dataloader` once Accelerate has sharded it across processes."""
    with transient_preparations(accelerator):
        return len(accelerator.prepare(dataloader))


def _set_train_mode(model: nn.Module, *, frozen_statistics: bool) -> None:
    model.train()
    if frozen_statistics:
        # running statistics (BatchNorm) are saved with the weights: a masked run must not move them either
        for module in model.modules():
            if getattr(module, "track_running_stats", False):
                module.eval()
