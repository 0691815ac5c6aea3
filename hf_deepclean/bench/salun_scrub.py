"""Building blocks of two classifier baselines of `baselines.py`: SalUn and SCRUB.

SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image
Classification and Generation", ICLR 2024) trains only the *salient* weights, those the forget loss pulls on
hardest in the trained model: with `g = grad_w sum_f CE(f(x_f; w), y_f)`, the mask is `m = 1(|g| >= gamma)` over all
elements together, `gamma` leaving a given share of them above it (the median, i.e. half, by default; the paper's
Eq. 3 and its released 50% masks). Its "random labelling" variant then minimises the loss on the forget rows, each
with a random wrong label fixed for the row, together with the retain rows, moving only the masked elements.

SCRUB (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023) distils a student (the trained model's
copy) from a frozen teacher (the trained model): max-steps on forget rows ascend `KL(teacher || student)`, min-steps
on retain rows descend `gamma * CE + alpha * KL(teacher || student)` (the weighting of the authors' code,
`gamma = 0.99`, `alpha = 0.001`, with the KL at temperature `T = 4` scaled by `T^2`). Max-steps are taken in the first
epochs only (a pass over the forget rows before each of those epochs' retain passes), min-steps in every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..errors import DeepCleanError
from ..unlearning.training import TrainingSchedule, release_training


SHIFT_COLUMN = "__salun_label_shift__"


def check_classifier(method: str, logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Raise a `DeepCleanError` unless `logits` are `(rows, classes)` and `labels` (if given) one class id per row."""
    if logits.dim() != 2 or (labels is not None and labels.shape != logits.shape[:1]):
        got = f"logits of shape {tuple(logits.shape)}" + (
            f", labels {tuple(labels.shape)}" if labels is not None else ""
        )
        raise DeepCleanError(f"{method}: needs a classifier (logits rows x classes, one class id per row); got {got}.")


def num_classes(method: str, model: nn.Module) -> int:
    """The classifier's number of classes (`model.config.num_labels`), at least 2."""
    count = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(count, int) or count < 2:
        raise DeepCleanError(
            f"{method}: needs a classifier with at least 2 classes (config.num_labels); got {count!r}."
        )
    return count


# --------------------------------------------------------------------------------------------------------------
# SalUn
# --------------------------------------------------------------------------------------------------------------


def forget_loss_gradient(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """`sum_i grad_w CE(f(x_i; w), y_i)` over the rows of `loader`, for each parameter of `params`, in eval mode.

    The sum is over rows, not over batch means (the authors' code sums batch means: the same up to a factor when
    batches are equal). Under several processes each passes its own rows (`process_shard`) and the sums are added.
    The model's `.grad` fields are left untouched.
    """
    gradients = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            check_classifier("salun", logits, labels)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads):
                if grad is not None:
                    gradients[name] += grad
    finally:
        model.train(was_training)
    if accelerator.num_processes > 1:
        gradients = {name: accelerator.reduce(grad, reduction="sum") for name, grad in gradients.items()}
    return gradients


def saliency_mask(gradients: Mapping[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """SalUn's hard weight-saliency mask, one threshold over all elements: `|g| >= gamma`, with `gamma` the
    `ceil(share * n)`-th largest of the `n` magnitudes (the median at `share=0.5`).

    Elements tied at `gamma` are all kept (so a little more than `share` may be selected); elements with a zero
    gradient are never salient (the forget loss does not touch them), so at most the nonzero ones are selected.
    """
    if not 0 < share <= 1:
        raise ValueError(f"saliency_mask: share must be in (0, 1]; got {share!r}.")
    magnitudes = {name: grad.detach().abs() for name, grad in gradients.items()}
    flat = torch.cat([m.flatten().float() for m in magnitudes.values()])
    k = math.ceil(share * flat.numel())
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    return {name: (m >= threshold.to(m.dtype)) & (m > 0) for name, m in magnitudes.items()}


def random_label_shifts(num_rows: int, num_classes: int, seed: int) -> list[int]:
    """One seeded shift in `1 .. num_classes - 1` per row: `(y + shift) % num_classes` is a wrong label, uniform
    among the `num_classes - 1` others and fixed for the row (the authors' code draws from all classes, the true
    one included)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, num_classes, (num_rows,), generator=generator).tolist()


class RandomLabelRows(torch.utils.data.Dataset):
    """SalUn's training rows: the forget rows, each with a random wrong label fixed by `seed`, then the retain rows as
    they are. Each row is a dict with a `SHIFT_COLUMN` entry (0 for retain rows) that `RandomLabelCollator` applies;
    nothing is copied."""

    def __init__(self, forget: Dataset, retain: Dataset, num_classes: int, seed: int):
        self.forget, self.retain = forget, retain
        self.shifts = random_label_shifts(len(forget), num_classes, seed)

    def __len__(self) -> int:
        return len(self.forget) + len(self.retain)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.forget):
            return {**self.forget[index], SHIFT_COLUMN: self.shifts[index]}
        return {**self.retain[index - len(self.forget)], SHIFT_COLUMN: 0}


class RandomLabelCollator:
    """A classification collator whose labels are shifted by each row's `SHIFT_COLUMN`: `(y + shift) % classes`."""

    def __init__(self, collator: Callable, num_classes: int):
        self.collator = collator
        self.num_classes = num_classes

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        labels = batch["labels"]
        if labels.dim() != 1:
            raise DeepCleanError(f"salun: needs one class id per row; got labels of shape {tuple(labels.shape)}.")
        shifts = torch.tensor([row[SHIFT_COLUMN] for row in rows], dtype=labels.dtype)
        batch["labels"] = (labels + shifts) % self.num_classes
        return batch


# --------------------------------------------------------------------------------------------------------------
# SCRUB
# --------------------------------------------------------------------------------------------------------------


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 KL(softmax(teacher / T) || softmax(student / T))`, averaged over rows (Hinton et al. 2015; SCRUB's
    `DistillKL`)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def train_scrub(
    student: nn.Module,
    teacher: nn.Module,
    forget_loader: DataLoader,
    retain_loader: DataLoader,
    accelerator: Accelerator,
    schedule: TrainingSchedule,
    *,
    max_epochs: int,
    alpha: float,
    gamma: float,
    temperature: float,
    desc: str = "SCRUB",
) -> dict[str, int]:
    """SCRUB's alternating loop, training `student` in place; `teacher` is only evaluated (no gradient).

    Args:
        student: the model to train, as `accelerator.prepare_model` returned it (wrapped for DDP under several
            processes).
        teacher: the frozen trained model (unwrapped); it is put in eval mode for the loop and put back after.
        forget_loader, retain_loader: plain (unprepared), seeded DataLoaders with `labels`.
        schedule: epochs (passes over the retain rows, fractions allowed), learning rate and the AdamW, scheduler
            and clipping settings; one schedule runs over all steps, max and min.
        max_epochs: the first `max_epochs` epochs begin with one pass of max-steps over the forget rows.
        alpha, gamma: min-step loss `gamma * CE + alpha * KL`.
        temperature: of both KL terms.

    Returns:
        `{"max_steps": ..., "min_steps": ...}`, the optimizer steps of each kind.
    """
    forget_loader, retain_loader = accelerator.prepare(forget_loader, retain_loader)
    min_steps = math.ceil(schedule.epochs * len(retain_loader))
    if min_steps == 0:
        return {"max_steps": 0, "min_steps": 0}
    epochs = math.ceil(min_steps / len(retain_loader))
    total_steps = min_steps + min(max_epochs, epochs) * len(forget_loader)
    optimizer = torch.optim.AdamW(student.parameters(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    # Accelerate's scheduler steps once per process at every optimizer step unless batches are split (`train_model`)
    per_update = 1 if accelerator.split_batches else accelerator.num_processes
    scheduler = get_scheduler(
        schedule.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(schedule.warmup_ratio * total_steps) * per_update,
        num_training_steps=total_steps * per_update,
    )
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)

    def step(loss: torch.Tensor) -> None:
        accelerator.backward(loss)
        if schedule.max_grad_norm:
            accelerator.clip_grad_norm_(student.parameters(), schedule.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def kl_to_teacher(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        outputs = student(**batch)
        check_classifier("scrub", outputs.logits, batch.get("labels"))
        return distillation_kl(outputs.logits, teacher_logits, temperature), outputs

    counts = {"max_steps": 0, "min_steps": 0}
    teacher_was_training = teacher.training
    teacher.eval()
    student.train()
    progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
    try:
        for epoch in range(epochs):
            if epoch < max_epochs:
                for batch in forget_loader:
                    step(-kl_to_teacher(batch)[0])
                    counts["max_steps"] += 1
                    progress.update(1)
            for batch in retain_loader:
                kl, outputs = kl_to_teacher(batch)
                step(gamma * outputs.loss + alpha * kl)
                counts["min_steps"] += 1
                progress.update(1)
                if counts["min_steps"] == min_steps:
                    break
    finally:
        progress.close()
        teacher.train(teacher_was_training)
        student.eval()
        release_training(accelerator, optimizer)
    return counts
