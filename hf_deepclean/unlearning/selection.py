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
from ..sharding import is_sharded
from .reset import ResetMasks
from .top_k import Block, count_true, largest_value, positive_counts, top_k_masks


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
    params: Mapping[str, torch.Tensor] | None = None,
) -> ResetMasks:
    """Choose the elements to reset.

    Args:
        ratios: Fisher ratios per parameter (under FSDP, this process's rows of each; see `params`).
        gamma: select every element with `ratio > gamma` (takes precedence over `reset_fraction`).
        reset_fraction: otherwise, select the `reset_fraction` share of all elements with the largest ratio.
        max_reset_fraction: never select more than this share; when the rule asks for more, the elements with
            the largest ratios are kept and a warning is logged.
        selection_scope: for `reset_fraction`, rank elements over the whole model (`global`), or take the top share
            of every parameter tensor separately (`per_parameter`), or of every layer (`per_layer`: the tensors
            `layer_of` groups together), so every tensor or layer gets reset a little. `gamma` is an elementwise
            threshold and ignores it.
        params: the parameters the ratios belong to, when some are sharded by FSDP2 (`ratios` then hold this
            process's rows, and every process must call this function): each process gets the masks of its rows,
            and together they are the masks one process would select. Default: the ratios are whole.

    Elements with a ratio of 0 (no Fisher information on the forget set) are never selected. A fraction rule
    selects exactly the requested number of elements (`hf_deepclean.unlearning.top_k`); ties at its threshold are
    taken in the order of the elements' index, parameter after parameter.

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
    params = ratios if params is None else params
    blocks = [Block(ratios[name].detach().float(), replicated=not is_sharded(params[name])) for name in names]
    total = sum(params[name].numel() for name in names)
    cap = round(max_reset_fraction * total)
    if gamma is not None:
        above = [(block.values > gamma) & (block.values > 0) for block in blocks]
        if count_true(above, blocks) > cap:
            logger.warning(
                f"gamma={gamma:g} selects {count_true(above, blocks)} of {total} elements, more than "
                f"--max_reset_fraction={max_reset_fraction:g}; keeping the top {cap} by ratio."
            )
            above = top_k_masks(blocks, [cap])
        selected = above
    elif selection_scope in ("per_parameter", "per_layer"):
        key = layer_of if selection_scope == "per_layer" else str
        group_of: dict[str, int] = {}
        for name in names:
            group_of.setdefault(key(name), len(group_of))
        sizes = [0] * len(group_of)
        for name in names:
            sizes[group_of[key(name)]] += params[name].numel()
        grouped = [Block(b.values, group_of[key(n)], b.replicated) for n, b in zip(names, blocks, strict=True)]
        selected = top_k_masks(grouped, [round(reset_fraction * size) for size in sizes])
        if count_true(selected, blocks) > cap:
            kept = [Block(torch.where(m, b.values, 0), 0, b.replicated) for m, b in zip(selected, blocks, strict=True)]
            selected = top_k_masks(kept, [cap])
    else:
        k = min(round(reset_fraction * total), cap)
        positive = positive_counts(blocks, 1)[0]
        if k > positive:
            logger.warning(f"only {positive} elements have a positive Fisher ratio; selecting those, not {k}.")
        selected = top_k_masks(blocks, [k])
    if count_true(selected, blocks) == 0:
        hint = (
            f"lower --gamma below the largest ratio {largest_value(blocks):.3g}"
            if gamma is not None
            else "raise --reset_fraction"
        )
        raise DeepCleanError(f"--gamma/--reset_fraction: the selection rule selects no weights; {hint}.")
    return {
        name: mask.view_as(ratios[name]).to(ratios[name].device) for name, mask in zip(names, selected, strict=True)
    }


def reset_statistics(masks: Mapping[str, torch.Tensor]) -> ResetStatistics:
    """How many elements were reset, per parameter and over the whole scope."""
    per_parameter = {name: ResetCount(int(mask.sum()), mask.numel()) for name, mask in masks.items()}
    total = ResetCount(
        sum(count.reset for count in per_parameter.values()), sum(count.numel for count in per_parameter.values())
    )
    return ResetStatistics(total=total, per_parameter=per_parameter)
