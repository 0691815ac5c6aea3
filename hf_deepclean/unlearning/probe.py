"""The repair's learning rate: a short probe of a few candidate rates on the reset model, or the configured rate."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


# A sweep tells rates apart only once some trial brought the loss this far (relative) below the reset model's. Right
# after a heavy reset every rate can still sit at the chance loss after a few steps; the tie rule would then pick the
# smallest rate, which cannot repair the model. Such a sweep is repeated with PROBE_GROWTH times the steps.
PROBE_MIN_PROGRESS = 0.05
PROBE_GROWTH = 4
PROBE_ROUNDS = 3


# Given the original model's loss, both rules above are also measured against the reset's damage (the reset model's
# loss less the original's): a sweep also separates once some trial won back PROBE_DAMAGE_PROGRESS of the damage,
# and a tie must also be a difference within PROBE_DAMAGE_TOLERANCE of it. After a light reset (a small share of an
# adapter's elements) the damage is a few percent of the loss, and rules in percent of the loss cannot tell rates
# apart: a 10-step sweep that won back 41% of the damage read as no progress and was repeated with 40-step trials,
# most of DeepClean's time. Where the damage is a fifth of the loss or more (the reviews, digits and full fine-tune
# facts resets), the rules in percent of the loss are the binding ones and decide as before.
PROBE_DAMAGE_PROGRESS = 0.25
PROBE_DAMAGE_TOLERANCE = 0.10


# A reset that left the retain loss within this much (relative) of the original model's did too little damage for
# trials to measure: there is nothing to tell rates apart by, and the repeated sweeps would cost more than the repair.
# The repair then takes the smallest candidate, the one that disturbs the kept weights least, and early stopping (on
# for classifiers) ends it once retain accuracy is back. (On the reviews and facts tuning runs every default reset
# raised the loss by more, and the rule changed no figure; docs/decisions.md.)
PROBE_MIN_DAMAGE = 0.05


# Whether the repair continues from the chosen rate's trial, whose steps then count against its budget, instead of
# starting over from the reset weights. Off: on the reviews tuning seeds 0-2 restarting left the smaller gap to the
# retrained model on average (docs/decisions.md, 2026-12-07). Read at call time (scripts/tune_deepclean.py's
# `probe_keep` turns it on).
KEEP_CHOSEN_TRIAL = False


@dataclass
class LearningRateProbe:
    """What the learning-rate probe found.

    Attributes:
        rate: the chosen rate.
        losses: `{rate: loss}` of the last sweep's trials, in the order tried (largest rate first).
        steps: optimizer steps per trial in the last sweep.
        start_loss: the loss before any trial (the reset model's).
        separated: whether some trial made progress (`PROBE_MIN_PROGRESS`); if none did in any sweep, the rate is
            the largest one whose trial did not make the loss worse.
        reference_loss: the original model's loss on the same rows, before the reset, when it was given.
        kept_steps: with `keep_chosen_trial`, the steps of the chosen rate's trial, whose weights the model kept
            (0: the model came back as it was).
    """

    rate: float
    losses: dict[float, float]
    steps: int
    start_loss: float
    separated: bool
    reference_loss: float | None = None
    kept_steps: int = 0

    @property
    def undamaged(self) -> bool:
        """No trial ran: the reset left the loss within `PROBE_MIN_DAMAGE` of `reference_loss`."""
        return self.steps == 0


def probe_learning_rate(
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    accelerator: Accelerator,
    *,
    candidates: Sequence[float] = LEARNING_RATE_CANDIDATES,
    steps: int = PROBE_STEPS,
    max_steps: int | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    tolerance: float = PROBE_TOLERANCE,
    min_progress: float = PROBE_MIN_PROGRESS,
    reference_loss: float | None = None,
    min_damage: float = PROBE_MIN_DAMAGE,
    keep_chosen_trial: bool = False,
    **optimizer_arguments,
) -> LearningRateProbe:
    """Choose a learning rate by a short trial of each candidate from the same weights (a learning-rate probe).

    Each trial trains `steps` optimizer steps at a constant rate with `train_model` (same masks, data order and
    seed), measures the mean loss on `eval_dataloader`, and puts the weights back. Trials run from the largest rate
    down. A rate whose loss is within `tolerance` (relative) of the lowest loss so far becomes the choice: a tie
    goes to the smaller rate, which is the safer one over a repair much longer than the trial. The sweep stops at
    the first rate that is worse than that by more than `tolerance` (the loss after a fixed number of steps is
    U-shaped in log learning rate), so a model that clearly takes the largest rate costs two trials. A trial whose
    loss is not finite (divergence) counts as infinitely bad.

    A sweep in which no trial brought the loss `min_progress` below the loss before the trials cannot tell the
    rates apart (they all still sit where the reset left the model): it is repeated with `PROBE_GROWTH` times the
    steps, up to `PROBE_ROUNDS` sweeps and `max_steps` steps per trial. If no sweep separates the rates, the
    choice is the largest rate whose trial did not make the loss worse: a small rate that cannot move the model in a
    trial cannot repair it either.

    With `reference_loss` (the model's loss on `eval_dataloader` before the reset), a reset that left the loss at
    most `min_damage` (relative) above it gets no trial at all: the choice is the smallest candidate. Otherwise the
    rules are also measured against the damage, `start_loss - reference_loss`: a trial that won back
    `PROBE_DAMAGE_PROGRESS` of it separates the rates too, and a tie must also be within `PROBE_DAMAGE_TOLERANCE`
    of it.

    With `keep_chosen_trial`, the model ends with the weights and buffers the chosen rate's trial (of the last sweep)
    left, so that a training at that rate can go on from them (`kept_steps`); the weights of the trials are kept on
    the side meanwhile (of a masked parameter its selected elements only, the rest does not move). Without it, or
    when no sweep separated the rates, the model comes back as it was.

    Args:
        model: the model as `train_model` takes it; it comes back with the weights and buffers it had, or with
            `keep_chosen_trial` those of the chosen trial.
        train_dataloader: a plain DataLoader of the training rows (the first batches of each trial are used).
        eval_dataloader: a plain DataLoader of the rows the loss is measured on.
        accelerator: the run's Accelerator.
        candidates: the rates to try, in any order (tried largest first).
        steps: optimizer steps per trial in the first sweep.
        max_steps: the most steps per trial a repeated sweep may take (default: no repeat beyond `PROBE_ROUNDS`).
        masks: as for `train_model`.
        tolerance: relative difference of losses that counts as a tie.
        min_progress: relative loss decrease that some trial must reach for a sweep to separate the rates.
        reference_loss: the loss before the reset, on the rows of `eval_dataloader`.
        min_damage: relative loss increase over `reference_loss` below which no trial runs.
        keep_chosen_trial: leave the model with the chosen trial's weights (see above).
        optimizer_arguments: other `train_model` arguments (`weight_decay`, `max_grad_norm`); the schedule is
            constant and without warm-up during trials.

    Returns:
        The choice and the last sweep's losses; the same on every process.
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

    steps_per_epoch = max(1, optimizer_steps_per_epoch(train_dataloader, accelerator))
    arguments = {**optimizer_arguments, "warmup_ratio": 0.0, "lr_scheduler_type": "constant"}

    # the weights the last trial left, and those of the current sweep's choice (with `keep_chosen_trial`)
    trained: dict[str, dict[str, torch.Tensor]] = {}

    def trial(rate: float, trial_steps: int) -> float:
        try:
            # every trial sees the same batches (the restored generator) and the same dropout draws
            with preserved_random_state(accelerator):
                train_model(
                    model,
                    train_dataloader,
                    accelerator,
                    epochs=trial_steps / steps_per_epoch,
                    learning_rate=rate,
                    masks=masks,
                    desc=f"Probe lr {rate:g}",
                    **arguments,
                )
                loss = mean_loss(model, eval_dataloader, accelerator)
            if keep_chosen_trial:
                trained["last"] = capture_trained(state, masks)
            return loss
        finally:
            restore()

    def keep_choice(rate: float) -> None:  # the sweep chose `rate`: keep its trial's weights
        if "last" in trained:
            trained["chosen"] = trained.pop("last")

    with preserved_random_state(accelerator):
        start_loss = mean_loss(model, eval_dataloader, accelerator)
    rates = sorted(set(candidates), reverse=True)
    if reference_loss is not None and start_loss <= reference_loss * (1 + min_damage):
        return LearningRateProbe(rates[-1], {}, 0, start_loss, separated=False, reference_loss=reference_loss)
    # the progress that separates rates and the difference that is a tie, in loss units (module constants above)
    damage = start_loss - reference_loss if reference_loss is not None else math.inf
    needed = min(min_progress * start_loss, PROBE_DAMAGE_PROGRESS * damage)
    tie_margin = PROBE_DAMAGE_TOLERANCE * damage
    trial_steps = steps
    for _ in range(PROBE_ROUNDS):
        trained.clear()
        choice, losses = sweep(
            rates,
            lambda rate, n=trial_steps: trial(rate, n),
            tolerance,
            on_choice=keep_choice,
            tie_margin=tie_margin,
        )
        if min(losses.values()) <= start_loss - needed:
            kept = 0
            if "chosen" in trained:
                apply_trained(state, trained.pop("chosen"), masks)
                kept = trial_steps
            return LearningRateProbe(choice, losses, trial_steps, start_loss, True, reference_loss, kept)
        if max_steps is None or trial_steps * PROBE_GROWTH > max_steps:
            break
        trial_steps *= PROBE_GROWTH
    trained.clear()
    # no sweep separated the rates: the largest rate that did not make things worse (else the best one tried)
    harmless = [rate for rate, loss in losses.items() if loss <= start_loss * (1 + tolerance)]
    chosen = harmless[0] if harmless else min(losses, key=losses.get)
    return LearningRateProbe(chosen, losses, trial_steps, start_loss, False, reference_loss)


def sweep(
    rates: Sequence[float],
    loss_of: Callable[[float], float],
    tolerance: float,
    on_choice: Callable[[float], None] | None = None,
    tie_margin: float = math.inf,
) -> tuple[float, dict[float, float]]:
    """One sweep over `rates` (largest first) with the tie rule of `probe_learning_rate`: `(choice, {rate: loss})`.
    A loss ties with the lowest so far when it is within `tolerance` of it (relative) and within `tie_margin` of it
    (absolute). `on_choice(rate)` is called right after the trial of each rate that becomes the choice."""
    losses: dict[float, float] = {}
    chosen, lowest = None, math.inf
    for rate in rates:
        loss = losses[rate] = loss_of(rate)
        if chosen is not None and not (loss <= lowest * (1 + tolerance) and loss <= lowest + tie_margin):
            break
        chosen, lowest = rate, min(lowest, loss)
        if on_choice is not None:
            on_choice(rate)
    return chosen, losses


def capture_trained(
    state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """What a trial changed in `state`: the selected elements of a masked parameter (the others cannot move in a
    masked training), a copy of anything else it may change (buffers, an unmasked training's parameters, a sharded
    parameter whole: its mask holds this process's rows)."""
    return {
        name: value.detach()[masks[name].to(value.device)].clone()
        if masked_in_place(name, value, masks)
        else value.detach().clone()
        for name, value in state.items()
        if may_change(name, value, masks)
    }


@torch.no_grad()
def apply_trained(
    state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None
) -> None:
    """Put the values `capture_trained` took back into `state`."""
    for name, values in trained.items():
        value = state[name]
        if masked_in_place(name, value, masks):
            value[masks[name].to(value.device)] = values
        else:
            value.copy_(values)


def may_change(name: str, value: torch.Tensor, masks: Mapping[str, torch.Tensor] | None) -> bool:
    """Whether a training with `masks` can change `value`: a masked training moves masked parameters only."""
    return masks is None or name in masks or not isinstance(value, nn.Parameter)


def masked_in_place(name: str, value: torch.Tensor, masks: Mapping[str, torch.Tensor] | None) -> bool:
    """Whether `value` is a plain tensor that only the `True` elements of its mask change in a masked training."""
    return (
        masks is not None
        and name in masks
        and type(value.data) is torch.Tensor
        and tuple(masks[name].shape) == tuple(value.shape)
    )


def probe_needed(config: DeepCleanConfig) -> bool:
    """Whether `choose_repair_learning_rate` runs the probe: a repair with no rate given (`--learning_rate`, or
    `--base_reset_learning_rate` after a reset to a base model)."""
    given = config.learning_rate is not None or (
        config.reset == "base" and config.base_reset_learning_rate is not None
    )
    return bool(config.repair_epochs) and not given


def choose_repair_learning_rate(
    config: DeepCleanConfig,
    model: nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    accelerator: Accelerator,
    masks: Mapping[str, torch.Tensor],
    *,
    reference_loss: float | None = None,
) -> tuple[float | None, LearningRateProbe | None]:
    """The rate of DeepClean's repair of the reset elements (`masks`): `config.learning_rate` when set; else, after a
    reset to a base model's values (`config.reset == "base"`, as `run_deepclean` decides it),
    `config.base_reset_learning_rate` when set; else the one `probe_learning_rate` chooses with the run's optimizer
    settings (logged), given the original model's loss on `eval_dataloader` as `reference_loss`. A repeated sweep
    may take up to half the repair's steps per trial. With `KEEP_CHOSEN_TRIAL` the model keeps the chosen trial's
    weights and the repair goes on from them (`probe.kept_steps`); otherwise it comes back as it was.

    Returns:
        `(rate, probe)`; `(config.learning_rate, None)` without a probe, and the rate is `None` when nothing is
        repaired and none was set.
    """
    if not probe_needed(config):
        if config.learning_rate is None and config.repair_epochs:
            logger.info(
                f"Repair learning rate {config.base_reset_learning_rate:g} (--base_reset_learning_rate: the reset went "
                "to the base model's values, so no probe).",
                main_process_only=True,
            )
            return config.base_reset_learning_rate, None
        return config.learning_rate, None
    repair_steps = math.ceil(config.repair_epochs * optimizer_steps_per_epoch(train_dataloader, accelerator))
    probe = probe_learning_rate(
        model,
        train_dataloader,
        eval_dataloader,
        accelerator,
        max_steps=max(PROBE_STEPS, repair_steps // 2),
        masks=masks,
        reference_loss=reference_loss,
        min_damage=PROBE_MIN_DAMAGE,  # read at call time (scripts/tune_deepclean.py compares it with trials always)
        keep_chosen_trial=KEEP_CHOSEN_TRIAL and repair_steps >= PROBE_STEPS,  # no trial longer than the repair
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )
    if probe.undamaged:
        logger.info(
            f"Repair learning rate {probe.rate:g}, the smallest candidate, without trials: the reset left the retain "
            f"loss at {probe.start_loss:.4g} against the original model's {probe.reference_loss:.4g} (within "
            f"{PROBE_MIN_DAMAGE:.0%}), too close for trials to tell rates apart.",
            main_process_only=True,
        )
        return probe.rate, probe
    tried = ", ".join(f"{r:g}: {loss:.4g}" for r, loss in probe.losses.items())
    message = (
        f"Repair learning rate {probe.rate:g} (probe losses after {probe.steps} steps {tried}; "
        f"{probe.start_loss:.4g} before"
        + (f", the original model's {probe.reference_loss:.4g}" if probe.reference_loss is not None else "")
        + ")."
        + (f" The repair continues from that rate's trial ({probe.kept_steps} steps)." if probe.kept_steps else "")
    )
    if probe.separated:
        logger.info(message, main_process_only=True)
    else:
        logger.warning(
            f"{message} No rate brought the retain loss {PROBE_MIN_PROGRESS:.0%} below the reset model's within "
            f"{probe.steps} steps, so the largest rate that did no harm was chosen; if the cleaned model is damaged, "
            "set --learning_rate or a smaller --reset_fraction.",
            main_process_only=True,
        )
    return probe.rate, probe


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
