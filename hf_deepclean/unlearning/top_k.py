"""The elements with the `k` largest values, over tensors that may be split across processes, without gathering them.

A radix search on the bits of the values finds the `k`-th largest exactly: non-negative float32 values order as
their bit patterns do, read as integers, so four rounds of a 256-bin histogram of the next 8 bits (summed across
processes, one `all_reduce` of `groups x 256` counts a round) narrow the value down bit for bit. Every element
above it is selected; elements equal to it are taken in the order of their index in the whole tensor, parameter
after parameter, until `k` are selected. The rule does not depend on how the tensors are split, so every layout of
the blocks, one process included, selects the same elements.

Values must be >= 0 (Fisher ratios); elements at 0 are never selected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Block:
    """One process's part of a tensor: `values` (its rows, or the whole tensor), the group it is ranked in, and
    whether every process holds the whole of it (`replicated`: counted once, on the first process)."""

    values: torch.Tensor
    group: int = 0
    replicated: bool = False


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sum(counts: torch.Tensor) -> torch.Tensor:
    if _world()[0] > 1:
        dist.all_reduce(counts)
    return counts


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The values' float32 bit patterns as int64 (0 for values <= 0), ordered as the values."""
    values = values.detach().float().reshape(-1)
    values = torch.where(values > 0, values, torch.zeros_like(values))
    return values.contiguous().view(torch.int32).to(torch.int64)


def positive_counts(blocks: Sequence[Block], groups: int) -> list[int]:
    """The number of elements > 0 in each group, over every process."""
    _, rank = _world()
    counts = torch.zeros(groups, dtype=torch.int64)
    for block in blocks:
        if not (block.replicated and rank):
            counts[block.group] += int((block.values > 0).sum())
    return _sum(counts).tolist()


def top_k_masks(blocks: Sequence[Block], ks: Sequence[int]) -> list[torch.Tensor]:
    """Boolean masks, one per block, selecting in each group `g` the `ks[g]` elements with the largest values
    (fewer if the group has fewer positive elements), over every process's blocks.

    Every process must call it with blocks of the same tensors in the same order (its own rows of each).
    """
    world, rank = _world()
    groups = len(ks)
    bits = [_bits(block.values) for block in blocks]
    counted = [not (block.replicated and rank) for block in blocks]
    positives = positive_counts(blocks, groups)
    need = torch.tensor([max(0, min(int(k), positives[g])) for g, k in enumerate(ks)], dtype=torch.int64)
    wanted = need.clone()
    prefix = torch.zeros(groups, dtype=torch.int64)
    for shift in (24, 16, 8, 0):
        histogram = torch.zeros(groups, 256, dtype=torch.int64)
        for block, values, counts in zip(blocks, bits, counted, strict=True):
            if not counts:
                continue
            candidates = values[(values > 0) & ((values >> (shift + 8)) == prefix[block.group])]
            histogram[block.group] += torch.bincount((candidates >> shift) & 0xFF, minlength=256)
        histogram = _sum(histogram)
        above = histogram.flip(1).cumsum(1).flip(1)  # above[g, b]: candidates in bins >= b
        for g in range(groups):
            if need[g] <= 0:
                continue
            bin_ = int((above[g] >= need[g]).nonzero()[-1])  # the highest bin holding the need-th largest
            need[g] -= int(above[g, bin_ + 1]) if bin_ < 255 else 0
            prefix[g] = (prefix[g] << 8) | bin_
    # prefix[g] is the k-th largest value's bits; need[g] of the elements equal to it are still to take
    ties = torch.zeros(world, len(blocks), dtype=torch.int64)
    for i, (block, values, counts) in enumerate(zip(blocks, bits, counted, strict=True)):
        if counts:
            ties[rank, i] = int(((values == prefix[block.group]) & (values > 0)).sum())
    ties = _sum(ties)  # every process's tie count of every block
    masks = []
    for i, (block, values) in enumerate(zip(blocks, bits, strict=True)):
        g = block.group
        threshold = prefix[g]
        if wanted[g] == 0:
            masks.append(torch.zeros_like(block.values, dtype=torch.bool))
            continue
        # ties go to blocks in order, and within a split tensor to processes in order (their rows in order)
        before = sum(int(ties[:, j].sum()) for j in range(i) if blocks[j].group == g)
        owner = 0 if block.replicated else rank
        before += int(ties[:owner, i].sum())
        take = max(0, min(int(need[g]) - before, int(ties[owner, i])))
        mask = (values > threshold) & (values > 0)
        equal = ((values == threshold) & (values > 0)).nonzero().squeeze(-1)
        mask[equal[:take]] = True
        masks.append(mask.view(block.values.shape))
    return masks


def count_true(masks: Sequence[torch.Tensor], blocks: Sequence[Block]) -> int:
    """The number of selected elements over every process (each replicated block counted once)."""
    _, rank = _world()
    counts = torch.tensor(
        [sum(int(m.sum()) for m, b in zip(masks, blocks, strict=True) if not (b.replicated and rank))]
    )
    return int(_sum(counts)[0])


def largest_value(blocks: Sequence[Block]) -> float:
    """The largest value over every process's blocks (NaN when there are no elements)."""
    local = [float(b.values.max()) for b in blocks if b.values.numel()]
    value = torch.tensor([max(local) if local else -math.inf], dtype=torch.float64)
    if _world()[0] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0]) if math.isfinite(float(value[0])) else math.nan
