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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils.memory import clear_device_cache
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..distributed import transient_preparations
from ..sharding import any_process, any_sharded, like_parameter, local_tensor
from .forget_losses import ForgetTerm, ascent_term


if TYPE_CHECKING:
    from ..config import DeepCleanConfig


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
    ascent_dataloader: DataLoader | None = None,
    ascent_weight: float = 0.0,
    forget_term: ForgetTerm = ascent_term,
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
        ascent_dataloader: with `ascent_weight > 0`, rows to forget (a plain DataLoader, cycled): the step minimises
            `loss(batch) + ascent_weight * forget_term(model, ascent batch)`, one batch of each (DeepClean's
            forget-ascent variant, `--forget_ascent_weight`). Masks apply to both gradients.
        ascent_weight: the weight of the forget term (0: plain training).
        forget_term: `(model, batch) -> loss` on the rows to forget (`forget_losses`; default: `-loss`, ascent).

    Returns:
        `{"steps": ..., "final_loss": ..., "stopped_early": ...}` (`final_loss` is `None` when no step was taken).
    """
    with transient_preparations(accelerator):  # nothing this training prepared outlives it
        unwrapped = accelerator.unwrap_model(model)
        named = dict(unwrapped.named_parameters())
        if masks is None:
            trainable = {name: p for name, p in named.items() if p.requires_grad}
        else:
            selected = {name: bool(mask.any()) for name, mask in masks.items()}
            if any_sharded(named):  # masks hold this process's rows: a parameter trains if any process selected in it
                selected = any_process(selected)
            trainable = {name: named[name] for name, chosen in selected.items() if chosen}
        dataloader = accelerator.prepare(dataloader)  # each process its shard of every global batch (a DataLoader)
        ascent = accelerator.prepare(ascent_dataloader) if ascent_dataloader is not None and ascent_weight else None
        ascent_batches = iter(())
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
        # FSDP2 (`hf_deepclean.sharding`): the model already splits its weights and averages gradients across
        # processes; its sharded gradients are masked before each step instead of by a hook
        sharded = any_sharded(trainable)
        for name, p in named.items():
            p.requires_grad_(name in trainable)
        if masks is not None:
            for name, p in trainable.items():
                # under FSDP a mask holds this process's rows, and becomes a DTensor split as the parameter is
                mask = like_parameter(masks[name].to(local_tensor(p).device), p)
                device_masks[name] = mask
                anchors[name] = p.detach().clone()
                if not sharded:
                    # a tensor hook runs before DDP averages the gradient: every process averages masked gradients
                    hooks.append(p.register_hook(lambda grad, mask=mask: grad * mask))
        if accelerator.num_processes > 1 and not sharded:
            # DDP over exactly the trainable parameters (those with requires_grad when it is built). Accelerate returns
            # a module it prepared before (for evaluation) unchanged, so its mark is lifted for this preparation.
            unwrapped.__dict__.pop("_is_accelerate_prepared", None)
            model = accelerator.prepare_model(unwrapped)

        optimizer = torch.optim.AdamW(list(trainable.values()), lr=learning_rate, weight_decay=weight_decay)
        # Accelerate's scheduler takes one step per process at every optimizer step (it expects schedules counted in
        # one-process steps) unless batches are split, so the counts are scaled to keep `total_steps` optimizer steps
        # (under FSDP the optimizer is not prepared, see below: its scheduler steps once per update)
        scheduler_steps_per_update = 1 if accelerator.split_batches or sharded else accelerator.num_processes
        scheduler = get_scheduler(
            lr_scheduler_type,
            optimizer,
            num_warmup_steps=int(warmup_ratio * total_steps) * scheduler_steps_per_update,
            num_training_steps=total_steps * scheduler_steps_per_update,
        )
        if not sharded:
            # Accelerate prepares an FSDP2 optimizer only together with the model, which hf_deepclean shards itself;
            # there is nothing for it to do under FSDP (no gradient scaler: fp16 is refused, `sharding_plan`)
            optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        _set_train_mode(unwrapped, frozen_statistics=masks is not None)
        step, loss_value, stopped_early = 0, None, False
        progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
        try:
            while step < total_steps:
                for batch in dataloader:
                    loss = model(**batch).loss
                    if ascent is None:
                        accelerator.backward(loss)
                    else:
                        # two backward passes, gradients summed locally and averaged across processes once, by the
                        # second (DDP refuses two forward passes before one backward)
                        with accelerator.no_sync(model):
                            accelerator.backward(loss)
                        ascent_batch = next(ascent_batches, None)
                        if ascent_batch is None:  # cycle the ascent rows
                            ascent_batches = iter(ascent)
                            ascent_batch = next(ascent_batches)
                        accelerator.backward(ascent_weight * forget_term(model, ascent_batch))
                    if sharded and device_masks:
                        for name, mask in device_masks.items():
                            if trainable[name].grad is not None:
                                trainable[name].grad.mul_(mask)
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


@dataclass
class TrainingSchedule:
    """How a model was trained from its initial weights (what `retrain` repeats on the retain rows)."""

    epochs: float
    learning_rate: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    batch_size: int = 32
    max_grad_norm: float = 1.0

    @classmethod
    def repair_budget(
        cls, config: DeepCleanConfig, batch_size: int, learning_rate: float | None = None
    ) -> TrainingSchedule:
        """DeepClean's repair schedule, which `finetune` and `neggrad_plus` get too; `learning_rate` is the rate to
        use when `config.learning_rate` is unset (the probe's choice)."""
        rate = config.learning_rate if config.learning_rate is not None else learning_rate
        if rate is None:
            if config.repair_epochs:
                raise ValueError("repair_budget: config.learning_rate is unset; pass the probed learning_rate.")
            rate = 0.0  # nothing is trained
        return cls(
            epochs=config.repair_epochs,
            learning_rate=rate,
            weight_decay=config.weight_decay,
            warmup_ratio=config.warmup_ratio,
            lr_scheduler_type=config.lr_scheduler_type,
            batch_size=batch_size,
            max_grad_norm=config.max_grad_norm,
        )

    def after_steps(self, steps: int, steps_per_epoch: int) -> TrainingSchedule:
        """The rest of this schedule's budget once `steps` optimizer steps of it were taken elsewhere (a probe trial
        at its rate): the epochs of the steps left, which `train_model` turns into exactly that many steps."""
        total = math.ceil(self.epochs * steps_per_epoch)
        left = max(0, total - steps)
        epochs = left / steps_per_epoch
        while math.ceil(epochs * steps_per_epoch) > left:  # float rounding must not add a step
            epochs = math.nextafter(epochs, 0.0)
        return replace(self, epochs=epochs)

    def optimizer_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `train_model` / `repair_selected_weights` (all but the batch size)."""
        return {key: value for key, value in asdict(self).items() if key != "batch_size"}
