"""Unlearning methods in one harness: DeepClean and the baselines it must beat.

Every method takes the same `UnlearningInputs` (the trained model, forget and retain rows, an Accelerator) and
returns a new model; the trained model itself is never modified. `METHODS` maps a name to its function:

- `original`: do nothing. Its distance to `retrain` is the gap every method must close.
- `retrain`: train from the original's initial weights on the retain rows only, with the original's schedule:
  the gold standard.
- `retrain_reseeded`: the same retraining with another seed for shuffling and dropout (from the same initial
  weights). Its distance to `retrain` is how far two retrainings lie apart: the smallest gap a method can expect.
- `finetune`: fine-tune every weight on the retain rows with DeepClean's repair budget (epochs, learning rate).
- `neggrad_plus`: the same budget, descending `alpha * L_retain - (1 - alpha) * L_forget` (gradient ascent on the
  forget rows, descent on the retain rows; Kurmanji et al. 2023).
- `ssd`: Selective Synaptic Dampening (Foster et al. 2023): with the per-element Fisher diagonal on the forget
  rows `F_f` and on all training rows `F_D`, every element with `F_f > alpha * F_D` is multiplied by
  `min(lambda * F_D / F_f, 1)`; the others stay exactly as they are; no repair.
- `fisher_forgetting`: Fisher forgetting (Golatkar et al. 2020): Gaussian noise with variance
  `alpha * min(1 / (F_r + eps), max_inverse)` is added to every element, `F_r` being the retain Fisher diagonal.
  That is noise of standard deviation `sqrt(alpha) * F_r^(-1/2)` (exponent -1/2 on the Fisher, i.e. covariance
  `alpha * F_r^-1`), with the clamp of the authors' code.
- `deepclean`: this library's method, the very function `hf-deepclean unlearn` runs (`run_deepclean`): Fisher ratio,
  selection, reset, learning-rate probe, masked repair, with the settings of a `DeepCleanConfig`; `reset="base"`
  resets to `UnlearningInputs.initial_state`, the weights the training started from.
- `salun`: SalUn (Fan et al. 2024), for classifiers: only the elements with the largest |gradient of the forget
  loss| on the trained model (the top `salun_mask_share`, half by default) train, on the forget rows with a random
  wrong label each and the retain rows, with the same budget (`repair_epochs` passes over forget and retain rows).
- `scrub`: SCRUB (Kurmanji et al. 2023), for classifiers: a student copy moves away from the frozen trained model on
  the forget rows (max-steps on `KL(teacher || student)`, first `scrub_max_epochs` epochs) and stays close to it on
  the retain rows (min-steps on `gamma CE + alpha KL`), with the same budget (`repair_epochs` passes over retain
  rows). Their building blocks are in `hf_deepclean.bench.salun_scrub`.
- `gradient_ascent`, `gradient_difference`, `npo`, `simnpo`: for causal language models, with the same budget as
  `finetune`; see `hf_deepclean.bench.llm_baselines`.

All Fisher diagonals here are the per-sample empirical Fisher of `hf_deepclean.fisher.engine` (SSD and Fisher forgetting
originally use squared batch gradients; the per-sample quantity is the one the method defines).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import DeepCleanConfig
from ..data.collators import make_dataloader
from ..distributed import process_shard, transient_preparations
from ..errors import DeepCleanError
from ..fisher.engine import FisherDiagonal, accumulate_fisher_sums
from ..modeling import get_parameters_in_scope
from ..pipeline.deepclean import UnlearningRows, run_deepclean
from ..records import StageTimer
from ..unlearning.training import TrainingSchedule, release_training, train_model
from .llm_baselines import LANGUAGE_MODEL_METHODS, LanguageModelBaselineConfig
from .salun_scrub import (
    RandomLabelCollator,
    RandomLabelRows,
    forget_loss_gradient,
    num_classes,
    saliency_mask,
    train_scrub,
)


@dataclass
class BaselineConfig(LanguageModelBaselineConfig):
    """Hyperparameters of the baselines (DeepClean's own are in `DeepCleanConfig`; the causal-LM baselines' come
    first, from `LanguageModelBaselineConfig`)."""

    neggrad_alpha: float = field(
        default=0.99,
        metadata={"help": "NegGrad+: weight of the retain loss; the forget loss is ascended with weight 1 - alpha."},
    )
    ssd_alpha: float = field(
        default=10.0, metadata={"help": "SSD: select elements with F_forget > alpha * F_full (paper default 10)."}
    )
    ssd_lambda: float = field(
        default=1.0, metadata={"help": "SSD: dampen selected elements by min(lambda * F_full / F_forget, 1)."}
    )
    fisher_forgetting_alpha: float = field(
        default=1e-6,
        metadata={"help": "Fisher forgetting: noise variance alpha / F_retain per element (authors' code: 1e-6)."},
    )
    fisher_forgetting_max_inverse: float = field(
        default=1e3, metadata={"help": "Fisher forgetting: clamp of 1 / F_retain before scaling by alpha."}
    )
    salun_mask_share: float = field(
        default=0.5,
        metadata={
            "help": "SalUn: share of all weight elements that train, those with the largest |gradient of the forget "
            "loss| on the trained model (paper: 0.5, the median)."
        },
    )
    scrub_alpha: float = field(
        default=0.001,
        metadata={
            "help": "SCRUB: weight of KL(teacher || student) in the min-steps on retain rows (authors' code: 0.001)."
        },
    )
    scrub_gamma: float = field(
        default=0.99,
        metadata={"help": "SCRUB: weight of the cross-entropy in the min-steps on retain rows (authors' code: 0.99)."},
    )
    scrub_temperature: float = field(
        default=4.0,
        metadata={"help": "SCRUB: softmax temperature T of the KL terms, scaled by T^2 (authors' code: 4)."},
    )
    scrub_max_epochs: int = field(
        default=2,
        metadata={
            "help": "SCRUB: the first N epochs begin with a pass of max-steps on the forget rows (authors' code "
            "msteps: 2); 0 for min-steps only."
        },
    )
    baseline_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "finetune, neggrad_plus, salun, scrub and the causal-LM baselines: their learning rate when "
            "--learning_rate is unset "
            "(default: the rate the scenario trained the model at, 3e-3 on digits and 5e-5 on the reviews; 1e-3 "
            "when unknown). DeepClean's probe does not apply to them: it measures how fast reset weights repair, "
            "and a fine-tune of a converged model has none, so its retain loss favours barely moving."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        positive = (lambda value: 0 < value < math.inf, "a finite number > 0")
        non_negative = (lambda value: 0 <= value < math.inf, "a finite number >= 0")
        checks = {
            "neggrad_alpha": (lambda value: 0 <= value <= 1, "a number in [0, 1]"),
            "ssd_alpha": positive,
            "ssd_lambda": positive,
            "fisher_forgetting_alpha": positive,
            "fisher_forgetting_max_inverse": positive,
            "salun_mask_share": (lambda value: 0 < value <= 1, "a number in (0, 1]"),
            "scrub_alpha": non_negative,
            "scrub_gamma": non_negative,
            "scrub_temperature": positive,
            "scrub_max_epochs": (lambda value: isinstance(value, int) and value >= 0, "an integer >= 0"),
            "baseline_learning_rate": positive,
        }
        if self.baseline_learning_rate is None:
            del checks["baseline_learning_rate"]
        self.check_values(checks)
        if self.scrub_alpha == self.scrub_gamma == 0:
            raise DeepCleanError("--scrub_gamma: got 0 with --scrub_alpha 0; expected at least one of them > 0.")


@dataclass
class UnlearningInputs:
    """What every unlearning method receives.

    Args:
        model: the trained model, on `accelerator.device`; methods copy it and never modify it.
        forget: the rows to forget.
        retain: the remaining training rows.
        collator: turns rows into model inputs with `labels`.
        accelerator: the run's Accelerator.
        batch_size: batch size of Fisher passes, repair and fine-tuning.
        seed: seed of shuffling, initialisation and noise.
        held_out: held-out rows that methods may check themselves on (DeepClean's `retain_and_mia` early
            stopping), kept apart from the rows the benchmark reports.
        initial_state: the model's weights before training (needed by `retrain`, and by `deepclean` with
            `reset="base"`).
        pretrained: whether `initial_state` is a pretrained model (fine-tuned by the scenario) rather than a random
            initialisation: `reset="auto"` resets toward it only then, as `hf-deepclean unlearn` does toward a
            declared base model.
        training: the schedule that trained the model (needed by `retrain`).

    Fisher sums of the trained model are computed once and shared by the methods that need them; a method that
    reuses sums another method computed is charged their computing time in `charged_seconds`, so each method's
    time (its wall time plus its charge) is what it would take on its own. `deepclean` adds the seconds of each of
    its stages (Fisher passes, selection and reset, probe, repair) to `stage_seconds`, and its repair's record
    (`RepairRecord.to_dict()`: steps, early stop, rate and probe) to `repair`.
    """

    model: nn.Module
    forget: Dataset
    retain: Dataset
    collator: Callable
    accelerator: Accelerator
    batch_size: int = 32
    seed: int = 0
    held_out: Dataset | None = None
    initial_state: Mapping[str, torch.Tensor] | None = None
    training: TrainingSchedule | None = None
    pretrained: bool = False
    charged_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    repair: dict[str, Any] | None = None
    _fisher_cache: dict = field(default_factory=dict, repr=False)

    def loader(self, rows: Dataset, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        return make_dataloader(rows, self.collator, batch_size or self.batch_size, shuffle=shuffle, seed=self.seed)

    def fine_tuning_schedule(self, config: DeepCleanConfig, baselines: BaselineConfig) -> TrainingSchedule:
        """DeepClean's repair budget and optimizer settings at the baselines' learning rate (`baseline_rate`): what
        every fine-tuning baseline gets."""
        return TrainingSchedule.repair_budget(config, self.batch_size, baseline_rate(self, baselines))

    def copy_model(self) -> nn.Module:
        """A copy of the trained model, in eval mode, on the accelerator's device."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
        # Accelerate's mark of a prepared module would make it return the copy unwrapped (no DDP) when preparing it
        model.__dict__.pop("_is_accelerate_prepared", None)
        return model

    def fisher_sums(self, split: str, fisher_type: str = "empirical") -> tuple[FisherDiagonal, int]:
        """Sums of squared per-sample gradients of the trained model over `forget` or `retain`, and the count."""
        key = (split, fisher_type)
        if key in self._fisher_cache:
            result, seconds = self._fisher_cache[key]
            self.charged_seconds += seconds
            return result
        model = self.accelerator.unwrap_model(self.model)
        start = time.perf_counter()
        shard, first_index = process_shard(getattr(self, split), self.accelerator)  # each process its rows
        result = accumulate_fisher_sums(
            model,
            self.loader(shard),
            params=get_parameters_in_scope(model),
            fisher_type=fisher_type,
            accelerator=self.accelerator,
            seed=self.seed,
            desc=f"Fisher {split}",
            first_index=first_index,
        )
        self._fisher_cache[key] = (result, time.perf_counter() - start)
        return result

    def fisher(self, split: str, fisher_type: str = "empirical") -> FisherDiagonal:
        sums, count = self.fisher_sums(split, fisher_type)
        return {name: total / count for name, total in sums.items()}


def original(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """The trained model, unchanged (a copy)."""
    return inputs.copy_model()


def retrain(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Train the architecture from the original's initial weights on the retain rows, with the original's schedule."""
    if inputs.initial_state is None or inputs.training is None:
        raise DeepCleanError("retrain: needs the model's initial weights and training schedule; got none.")
    model = inputs.copy_model()
    model.load_state_dict(inputs.initial_state)
    return train_from_state(model, inputs.retain, inputs, inputs.training, desc="Retrain")


RESEED_OFFSET = 1_000_003  # `retrain_reseeded` shuffles with `seed + RESEED_OFFSET`, apart from every scenario seed


def retrain_reseeded(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """`retrain` with another seed for the order of the retain rows and for dropout: a second retrained model, whose
    distance to the first measures how much retraining itself varies (the noise floor of `avg_gap`)."""
    seed = inputs.seed + RESEED_OFFSET
    set_seed(seed)
    return retrain(replace(inputs, seed=seed), config, baselines)


def train_from_state(
    model: nn.Module, rows: Dataset, inputs: UnlearningInputs, schedule: TrainingSchedule, desc: str = "Train"
) -> nn.Module:
    """Train every weight of `model` on `rows` with `schedule` (seeded shuffling); returns the trained model."""
    prepared = inputs.accelerator.prepare_model(model, evaluation_mode=True)  # `train_model` wraps it for DDP
    train_model(
        prepared,
        inputs.loader(rows, shuffle=True, batch_size=schedule.batch_size),
        inputs.accelerator,
        desc=desc,
        **schedule.optimizer_arguments(),
    )
    return inputs.accelerator.unwrap_model(prepared).eval()


def finetune(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Fine-tune every weight on the retain rows with DeepClean's repair budget and optimizer settings (an unset
    learning rate is `baseline_rate(inputs, baselines)`)."""
    schedule = inputs.fine_tuning_schedule(config, baselines)
    return train_from_state(inputs.copy_model(), inputs.retain, inputs, schedule, desc="Finetune")


def neggrad_plus(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Descend `alpha * L_retain - (1 - alpha) * L_forget` for DeepClean's repair budget (retain epochs)."""
    accelerator = inputs.accelerator
    with transient_preparations(accelerator):  # the model copy, optimizer and loaders prepared here
        model = accelerator.prepare_model(inputs.copy_model())
        retain_loader = inputs.loader(inputs.retain, shuffle=True)
        total_steps = math.ceil(config.repair_epochs * len(retain_loader))
        if total_steps == 0:
            return accelerator.unwrap_model(model).eval()
        learning_rate = inputs.fine_tuning_schedule(config, baselines).learning_rate
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=config.weight_decay)
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=int(config.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        optimizer, retain_loader, forget_loader, scheduler = accelerator.prepare(
            optimizer, retain_loader, inputs.loader(inputs.forget, shuffle=True), scheduler
        )
        forget_batches = itertools.cycle(forget_loader)
        alpha = baselines.neggrad_alpha
        model.train()
        step = 0
        with tqdm(
            total=total_steps, desc="NegGrad+", disable=not accelerator.is_local_main_process, leave=False
        ) as bar:
            while step < total_steps:
                for batch in retain_loader:
                    loss = alpha * model(**batch).loss - (1 - alpha) * model(**next(forget_batches)).loss
                    accelerator.backward(loss)
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    bar.update(1)
                    if step >= total_steps:
                        break
        release_training(accelerator, optimizer)
        return accelerator.unwrap_model(model).eval()


def ssd_factors(forget: FisherDiagonal, full: FisherDiagonal, *, alpha: float, lam: float) -> dict[str, torch.Tensor]:
    """SSD's per-element multipliers: `min(lam * full / forget, 1)` where `forget > alpha * full`, else exactly 1."""
    factors = {}
    for name, f_forget in forget.items():
        selected = f_forget > alpha * full[name]
        dampen = torch.clamp(lam * full[name] / f_forget.clamp_min(torch.finfo(torch.float32).tiny), max=1.0)
        factors[name] = torch.where(selected, dampen, torch.ones_like(f_forget))
    return factors


def ssd(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Selective Synaptic Dampening: shrink the elements far more important to the forget rows than to all rows."""
    forget_sums, forget_count = inputs.fisher_sums("forget")
    retain_sums, retain_count = inputs.fisher_sums("retain")
    # additivity: the full-data Fisher is the pooled sum over forget and retain rows
    full = {name: (forget_sums[name] + retain_sums[name]) / (forget_count + retain_count) for name in forget_sums}
    forget = {name: total / forget_count for name, total in forget_sums.items()}
    factors = ssd_factors(forget, full, alpha=baselines.ssd_alpha, lam=baselines.ssd_lambda)
    model = inputs.copy_model()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, factor in factors.items():
            selected = factor != 1
            # only selected elements are written, so the others stay bit-for-bit equal
            params[name].copy_(torch.where(selected, params[name] * factor.to(params[name].dtype), params[name]))
    return model


def fisher_forgetting(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Add Gaussian noise of variance `alpha * min(1 / F_retain, max_inverse)` to every element."""
    retain = inputs.fisher("retain")
    model = inputs.copy_model()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(inputs.seed)
    with torch.no_grad():
        for name, fisher in retain.items():
            variance = baselines.fisher_forgetting_alpha * (1.0 / (fisher + config.eps)).clamp(
                max=baselines.fisher_forgetting_max_inverse
            )
            noise = torch.randn(fisher.shape, generator=generator) * variance.cpu().sqrt()
            params[name].add_(noise.to(params[name].device, params[name].dtype))
    return model


def baseline_rate(inputs: UnlearningInputs, baselines: BaselineConfig) -> float:
    """The learning rate of the fine-tuning baselines: `--baseline_learning_rate`, else the rate the model was
    trained at (a pretrained encoder fine-tuned at 5e-5 is destroyed at 1e-3), else 1e-3."""
    if baselines.baseline_learning_rate is not None:
        return baselines.baseline_learning_rate
    return inputs.training.learning_rate if inputs.training is not None else 1e-3


def deepclean(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """DeepClean with the settings of `config`: the pipeline's `run_deepclean` on a copy of the trained model.
    `reset="base"` resets to `UnlearningInputs.initial_state`, the weights the training started from (a pretrained
    encoder with a fresh head, or the random initialisation of a model trained from scratch); `reset="auto"` does so
    on pretrained scenarios only, and gives fresh values otherwise."""
    prepared = inputs.accelerator.prepare_model(inputs.copy_model(), evaluation_mode=True)
    rows = UnlearningRows(
        inputs.forget, inputs.retain, inputs.held_out, inputs.collator, batch_size=inputs.batch_size, seed=inputs.seed
    )
    known_base = config.reset == "base" or (config.reset == "auto" and inputs.pretrained)
    base_values = inputs.initial_state if known_base else None
    timer = StageTimer(inputs.stage_seconds)  # the benchmark reports where the time went
    outcome = run_deepclean(prepared, rows, config, inputs.accelerator, base_values=base_values, timer=timer)
    inputs.repair = outcome.repair.to_dict()  # the benchmark reports the rate and the steps it took
    return inputs.accelerator.unwrap_model(prepared).eval()


def salun(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """SalUn (Fan et al., ICLR 2024) with random labels: mask the elements whose |gradient of the forget loss| is in
    the top `salun_mask_share`, then train only those on the forget rows (each with a random wrong label, fixed and
    seeded) and the retain rows together, for `repair_epochs` passes with `finetune`'s optimizer settings."""
    accelerator = inputs.accelerator
    model = inputs.copy_model()
    classes = num_classes("salun", model)
    shard, _ = process_shard(inputs.forget, accelerator)
    gradients = forget_loss_gradient(model, inputs.loader(shard), accelerator, get_parameters_in_scope(model))
    masks = saliency_mask(gradients, baselines.salun_mask_share)
    rows = RandomLabelRows(inputs.forget, inputs.retain, classes, inputs.seed)
    collator = RandomLabelCollator(inputs.collator, classes)
    loader = make_dataloader(rows, collator, inputs.batch_size, shuffle=True, seed=inputs.seed)
    schedule = inputs.fine_tuning_schedule(config, baselines)
    prepared = accelerator.prepare_model(model, evaluation_mode=True)  # `train_model` wraps it for DDP
    train_model(prepared, loader, accelerator, masks=masks, desc="SalUn", **schedule.optimizer_arguments())
    return accelerator.unwrap_model(prepared).eval()


def scrub(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """SCRUB (Kurmanji et al., NeurIPS 2023): distil a student copy from the frozen trained model (the teacher),
    ascending their KL on the forget rows in the first `scrub_max_epochs` epochs and descending `gamma CE + alpha KL`
    on the retain rows, for `repair_epochs` passes over the retain rows with `finetune`'s optimizer settings."""
    accelerator = inputs.accelerator
    teacher = accelerator.unwrap_model(inputs.model)  # only evaluated: the trained model is the frozen teacher
    num_classes("scrub", teacher)
    schedule = inputs.fine_tuning_schedule(config, baselines)
    with transient_preparations(accelerator):  # the student, optimizer and loaders prepared here
        student = accelerator.prepare_model(inputs.copy_model())
        train_scrub(
            student,
            teacher,
            inputs.loader(inputs.forget, shuffle=True),
            inputs.loader(inputs.retain, shuffle=True),
            accelerator,
            schedule,
            max_epochs=baselines.scrub_max_epochs,
            alpha=baselines.scrub_alpha,
            gamma=baselines.scrub_gamma,
            temperature=baselines.scrub_temperature,
        )
        return accelerator.unwrap_model(student).eval()


METHODS: dict[str, Callable[[UnlearningInputs, DeepCleanConfig, BaselineConfig], nn.Module]] = {
    "original": original,
    "retrain": retrain,
    "retrain_reseeded": retrain_reseeded,
    "finetune": finetune,
    "neggrad_plus": neggrad_plus,
    "ssd": ssd,
    "fisher_forgetting": fisher_forgetting,
    "salun": salun,
    "scrub": scrub,
    **LANGUAGE_MODEL_METHODS,
    "deepclean": deepclean,
}
