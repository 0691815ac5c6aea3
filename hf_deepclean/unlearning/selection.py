"""Which weights to reset: the Fisher ratio `F_forget / (F_retain + eps)`, optionally weighted by how far training
moved each element, and the rules that turn it into masks."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from ..config import SELECTION_SCOPES, SELECTION_WEIGHTINGS
from ..errors import DeepCleanError
from ..fisher.engine import FisherDiagonal
from ..records import ResetCount, ResetStatistics
from .reset import ResetMasks


logger = logging.getLogger(__name__)


def compute_fisher_ratio(forget: FisherDiagonal, retain: FisherDiagonal, eps: float = 1e-12) -> FisherDiagonal:
    """`r[i] = F_forget[i] / (F_retain[i] + eps)`, elementwise, for every parameter in `forget`."""
    missing = sorted(set(forget) - set(retain))
    if missing:
        raise DeepCleanError(f"retain Fisher lacks parameters {missing[:5]}; both must cover the same scope.")
    return {name: forget[name] / (retain[name] + eps) for name in forget}


def weigh_by_movement(
    ratios: FisherDiagonal,
    current: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    *,
    weighting: str = "movement",
    min_movement_quantile: float = 0.0,
) -> FisherDiagonal:
    """Fisher ratios adjusted by how far training moved each element, `m = |θ - θ_start|`.

    Args:
        ratios: Fisher ratios per parameter.
        current: the trained values of (at least) those parameters.
        start: the values training started from (a base model, or a from-scratch model's initial weights). A
            parameter it lacks, or holds with another shape, counts as started from zero (`m = |θ|`).
        weighting: `none`: the ratios as they are; `movement`: `ratio * m`.
        min_movement_quantile: elements whose `m` is below this quantile of their parameter tensor's `m` get a
            score of 0, so that no rule selects them (0: every element stays eligible).

    Returns:
        The adjusted scores, in the ratios' dtype and devices.
    """
    check_weighting(weighting, min_movement_quantile)
    scores = {}
    for name, ratio in ratios.items():
        value = current[name].detach().to(ratio.device, torch.float32)
        origin = start.get(name)
        if origin is None or tuple(origin.shape) != tuple(value.shape):
            origin = torch.zeros_like(value)
        movement = (value - origin.detach().to(value.device, torch.float32)).abs()
        score = ratio * movement.to(ratio.dtype) if weighting == "movement" else ratio.clone()
        if min_movement_quantile > 0 and movement.numel():
            # torch.quantile refuses very large inputs; kthvalue is exact at any size ("lower" interpolation)
            k = max(1, math.ceil(min_movement_quantile * movement.numel()))
            floor = movement.reshape(-1).kthvalue(k).values
            score = torch.where(movement >= floor, score, torch.zeros_like(score))
        scores[name] = score
    return scores


def check_weighting(weighting: str, min_movement_quantile: float) -> None:
    """Refuse an unknown `--selection_weighting` or a `--min_movement_quantile` outside [0, 1)."""
    if weighting not in SELECTION_WEIGHTINGS:
        raise DeepCleanError(
            f"--selection_weighting: got {weighting!r}; expected one of {', '.join(SELECTION_WEIGHTINGS)}."
        )
    valid = isinstance(min_movement_quantile, (int, float)) and not isinstance(min_movement_quantile, bool)
    if not (valid and 0.0 <= min_movement_quantile < 1.0):
        raise DeepCleanError(f"--min_movement_quantile: got {min_movement_quantile!r}; expected a number in [0, 1).")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to, for `selection_scope="per_layer"`: its name up to the last numeric
    component (`encoder.layer.3`), or, outside numbered blocks, its module (`embeddings.word_embeddings`)."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else ".".join(parts[:-1]) or name


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
        selection_scope: for `reset_fraction`, rank elements over the whole model (`global`), or take the top share
            of every parameter tensor separately (`per_parameter`), or of every layer (`per_layer`: the tensors
            `layer_of` groups together), so every tensor or layer gets reset a little. `gamma` is an elementwise
            threshold and ignores it.

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
    elif selection_scope in ("per_parameter", "per_layer"):
        parts = list(flat.split(sizes))
        key = layer_of if selection_scope == "per_layer" else str
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(key(name), []).append(index)
        chosen: list[torch.Tensor] = [torch.empty(0, dtype=torch.bool)] * len(names)
        for members in groups.values():
            group = torch.cat([parts[i] for i in members])
            pieces = _top_k_mask(group, round(reset_fraction * group.numel())).split([sizes[i] for i in members])
            for i, piece in zip(members, pieces, strict=True):
                chosen[i] = piece
        selected = torch.cat(chosen) if chosen else torch.zeros_like(flat, dtype=torch.bool)
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


def reset_statistics(masks: Mapping[str, torch.Tensor]) -> ResetStatistics:
    """How many elements were reset, per parameter and over the whole scope."""
    per_parameter = {name: ResetCount(int(mask.sum()), mask.numel()) for name, mask in masks.items()}
    total = ResetCount(
        sum(count.reset for count in per_parameter.values()), sum(count.numel for count in per_parameter.values())
    )
    return ResetStatistics(total=total, per_parameter=per_parameter)
