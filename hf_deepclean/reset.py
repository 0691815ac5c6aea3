"""Fisher ratio, selection of the weights to reset, the reset itself, and the masked repair (DESIGN §2, steps 2-4)."""

from __future__ import annotations

import copy as copy_module
import logging
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from .config import RESET_MODES, SELECTION_SCOPES
from .data import subsample
from .errors import DeepCleanError
from .evaluation import compute_sample_outputs, membership_inference_auc
from .fisher import FisherDiagonal
from .training import train_model


# Plain logging: these functions are pure tensor code, callable without an Accelerate state.
logger = logging.getLogger(__name__)

ResetMasks = dict[str, torch.Tensor]


def compute_fisher_ratio(forget: FisherDiagonal, retain: FisherDiagonal, eps: float = 1e-12) -> FisherDiagonal:
    """`r[i] = F_forget[i] / (F_retain[i] + eps)`, elementwise, for every parameter in `forget`."""
    missing = sorted(set(forget) - set(retain))
    if missing:
        raise DeepCleanError(f"retain Fisher lacks parameters {missing[:5]}; both must cover the same scope.")
    return {name: forget[name] / (retain[name] + eps) for name in forget}


def select_weights_to_reset(
    ratios: FisherDiagonal,
    *,
    gamma: float | None = None,
    reset_fraction: float | None = None,
    max_reset_fraction: float = 1.0,
    selection_scope: str = "global",
) -> ResetMasks:
    """Choose the elements to reset.

    Args:
        ratios: Fisher ratios per parameter.
        gamma: select every element with `ratio > gamma` (takes precedence over `reset_fraction`).
        reset_fraction: otherwise, select the `reset_fraction` share of all elements with the largest ratio.
        max_reset_fraction: never select more than this share; when the rule asks for more, the elements with
            the largest ratios are kept and a warning is logged.
        selection_scope: for `reset_fraction`, rank elements over the whole model (`global`) or take the top share
            of every parameter tensor separately (`per_parameter`, so every layer gets reset a little). `gamma` is
            an elementwise threshold and ignores it.

    Elements with a ratio of 0 (no Fisher information on the forget set) are never selected. A fraction rule
    selects exactly the requested number of elements; ties at its threshold are broken by `torch.topk`
    (deterministic for a given input on a given device).

    Returns:
        `{parameter name: bool mask}` for every parameter in `ratios`.

    Raises:
        DeepCleanError: if nothing is selected, with a hint on which argument to change.
    """
    if gamma is None and reset_fraction is None:
        raise DeepCleanError("--gamma/--reset_fraction: got neither; expected one of them.")
    if selection_scope not in SELECTION_SCOPES:
        raise DeepCleanError(
            f"--selection_scope: got {selection_scope!r}; expected one of {', '.join(SELECTION_SCOPES)}."
        )
    names = list(ratios)
    sizes = [ratios[name].numel() for name in names]
    flat = torch.cat([ratios[name].detach().reshape(-1).float() for name in names])
    total = flat.numel()
    cap = round(max_reset_fraction * total)
    if gamma is not None:
        selected = (flat > gamma) & (flat > 0)
        if int(selected.sum()) > cap:
            logger.warning(
                f"gamma={gamma:g} selects {int(selected.sum())} of {total} elements, more than "
                f"--max_reset_fraction={max_reset_fraction:g}; keeping the top {cap} by ratio."
            )
            selected = _top_k_mask(flat, cap)
    elif selection_scope == "per_parameter":
        selected = torch.cat([_top_k_mask(part, round(reset_fraction * part.numel())) for part in flat.split(sizes)])
        if int(selected.sum()) > cap:
            selected = _top_k_mask(torch.where(selected, flat, torch.zeros_like(flat)), cap)
    else:
        k = min(round(reset_fraction * total), cap)
        positive = int((flat > 0).sum())
        if k > positive:
            logger.warning(f"only {positive} elements have a positive Fisher ratio; selecting those, not {k}.")
            k = positive
        selected = _top_k_mask(flat, k)
    if not bool(selected.any()):
        largest = float(flat.max()) if total else float("nan")
        hint = (
            f"lower --gamma below the largest ratio {largest:.3g}" if gamma is not None else "raise --reset_fraction"
        )
        raise DeepCleanError(f"--gamma/--reset_fraction: the selection rule selects no weights; {hint}.")
    masks, offset = {}, 0
    for name in names:
        n = ratios[name].numel()
        masks[name] = selected[offset : offset + n].view_as(ratios[name]).to(ratios[name].device)
        offset += n
    return masks


def _top_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask & (flat > 0)


def reset_statistics(masks: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Share of elements reset, per parameter and overall (`"__total__"`)."""
    stats, selected, total = {}, 0, 0
    for name, mask in masks.items():
        count, numel = int(mask.sum()), mask.numel()
        stats[name] = {"reset": count, "numel": numel, "share": count / numel if numel else 0.0}
        selected, total = selected + count, total + numel
    stats["__total__"] = {"reset": selected, "numel": total, "share": selected / total if total else 0.0}
    return stats


def initial_values(model: nn.Module, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Fresh values for the named parameters, drawn by their own initialisation with `seed`.

    - Adapter weights (LoRA): the tuner layer's own `reset_lora_parameters`, as at adapter creation: LoRA's A
      matrices get fresh random values and B matrices zeros (embedding adapters the other way round), so a reset
      element of B switches its rank-one contribution off and a reset element of A is a new random direction
      that the repair can use once B is trained. Active copies of `modules_to_save` get the base model's
      `_init_weights`.
    - Everything else: a fresh model is built from the same config (its `_init_weights` is the initialisation the
      architecture was designed for); only the requested tensors are kept.
    """
    wanted = set(names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = _adapter_initial_values(model, wanted)
        rest = [name for name in names if name not in fresh]
        if rest:
            fresh_params = dict(type(model)(model.config).named_parameters())
            fresh.update({name: fresh_params[name].detach() for name in rest})
    return {name: fresh[name].to(dtype=dict(model.named_parameters())[name].dtype) for name in names}


def _adapter_initial_values(model: nn.Module, wanted: set[str]) -> dict[str, torch.Tensor]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return {}
    fresh: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            base_ids = {id(p) for p in base.parameters()}
            own = {prefix + k: p for k, p in module.named_parameters() if id(p) not in base_ids}
            if not wanted & set(own):
                continue
            if not hasattr(module, "reset_lora_parameters"):
                raise DeepCleanError(
                    f"--reset: got 'init', but the adapter layer {type(module).__name__} has no initialisation "
                    "routine; expected --reset zero for this adapter type."
                )
            # re-run the layer's initialisation in place, read the values, and put the trained ones back
            saved = {name: p.detach().clone() for name, p in own.items()}
            with torch.no_grad():
                for adapter in module.active_adapters:
                    module.reset_lora_parameters(adapter, True)
                for name, p in own.items():
                    fresh[name] = p.detach().clone()
                    p.copy_(saved[name])
        elif isinstance(module, ModulesToSaveWrapper):
            owner = model.get_base_model() if hasattr(model, "get_base_model") else model
            for adapter in module.active_adapters:
                copy = module.modules_to_save[adapter]
                names = {prefix + f"modules_to_save.{adapter}.{k}" for k, _ in copy.named_parameters()}
                if not wanted & names:
                    continue
                copy = copy_module.deepcopy(copy)
                for submodule in copy.modules():
                    owner._init_weights(submodule)
                for k, p in copy.named_parameters():
                    fresh[prefix + f"modules_to_save.{adapter}.{k}"] = p.detach()
    return {name: value for name, value in fresh.items() if name in wanted}


def reset_selected_weights(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    reset: str = "init",
    seed: int = 0,
    base_values: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Give the selected elements new values; every other element stays bit-for-bit as it is.

    Args:
        model: the model, changed in place.
        masks: `{parameter name: bool mask}` of the elements to reset.
        reset: `zero`: set them to zero (the paper); `init`: freshly initialised values (`initial_values` with
            `seed`); `base`: the values of `base_values`, the model the fine-tuning started from.
        seed: seed of the fresh values (`init`, and the fallback of `base`).
        base_values: with `reset="base"`, `{parameter name: tensor}` of the base model (only the selected
            parameters are read). A selected parameter it lacks, or holds with another shape (a classification
            head the base model does not have, say), gets the values `reset="init"` gives it with the same seed.

    Returns:
        The names of the selected parameters that fell back to fresh values under `reset="base"` (empty otherwise).
    """
    if reset not in RESET_MODES:
        raise DeepCleanError(f"--reset: got {reset!r}; expected one of {', '.join(RESET_MODES)}.")
    if reset == "base" and base_values is None:
        raise DeepCleanError("--reset: got 'base' without base values; expected --base_model_name_or_path.")
    params = dict(model.named_parameters())
    names = [name for name, mask in masks.items() if bool(mask.any())]
    fallback: list[str] = []
    if reset == "base":
        fallback = [
            name
            for name in names
            if name not in base_values or tuple(base_values[name].shape) != tuple(params[name].shape)
        ]
        mismatched = [name for name in fallback if name in base_values]
        if fallback:
            # said once, never silently: these parameters are not put back to the base model's values
            logger.info(
                f"--reset base: {len(fallback)} of {len(names)} selected parameters have no base value "
                f"({len(mismatched)} of them a base tensor of another shape), so they get freshly initialised "
                f"values: {', '.join(fallback[:5])}{', ...' if len(fallback) > 5 else ''}."
            )
        if len(fallback) == len(names):
            logger.warning(
                "--reset base: none of the selected parameters has a base value of the same shape; check that "
                "--base_model_name_or_path is the model the fine-tuning started from."
            )
    # drawn for every selected parameter, so that a fallback gets exactly what `init` would give it
    fresh = initial_values(model, names, seed) if reset == "init" or fallback else {}
    fallback_names = set(fallback)
    with torch.no_grad():
        for name in names:
            param, mask = params[name], masks[name].to(params[name].device)
            if reset == "zero":
                replacement = torch.zeros_like(param)
            elif reset == "init" or name in fallback_names:
                replacement = fresh[name]
            else:
                replacement = base_values[name]
            replacement = replacement.to(param.device, param.dtype)
            param.copy_(torch.where(mask, replacement, param))
    return fallback


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
        dataloaders: `{"forget", "retain", "test"}` loaders of the monitoring samples.
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
        criterion: str = "retain_and_mia",
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
        auc = membership_inference_auc(outputs["forget"]["loss"], outputs["test"]["loss"])
        self.history.append({"step": step, "retain_accuracy": retain_accuracy, "mia_auc": auc})
        recovered = retain_accuracy >= self.target_retain_accuracy
        return recovered if self.criterion == "retain" else recovered and auc <= 0.5 + self.auc_margin


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
    criterion: str = "retain_and_mia",
) -> RepairMonitor:
    """A `RepairMonitor` on seeded samples of at most 256 forget/retain/held-out rows, checking 4 times an epoch.

    The recovery target is the original model's accuracy on the retain sample, less `tolerance`.

    Args:
        model: the model being repaired.
        original_model: the model before the reset.
        rows: `{"forget", "retain", "test"}` datasets.
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
