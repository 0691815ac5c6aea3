"""Diagonal of the Fisher information, per sample, as docs/method.md defines it, computed near the cost of one backward.

`F_D[i] = (1/|D|) * sum_n (d/dθ_i log p(y_n | x_n; θ))²`, accumulated in float32.

How: one forward and one backward pass per batch of `sum_n log p(y_n|x_n)`. Samples do not interact
in an eval-mode model, so the gradient that reaches a layer's output for sample n is exactly the per-sample one.
Forward hooks keep each layer's input; tensor hooks on each layer's output receive the output gradient during
the backward pass, and a per-layer rule turns (input, output gradient) into squared per-sample weight gradients
right there, then frees both. Parameters are switched to `requires_grad=False` for the pass, so the batch weight
gradient, which is not needed, is never computed: the per-sample rules replace it at about the same cost.

Rules: `nn.Linear` (and transformers' `Conv1D`) with or without a sequence axis, `nn.Embedding` (padding index
respected), `nn.LayerNorm` / `nn.RMSNorm`, `nn.Conv2d`, eval-mode `nn.BatchNorm*d`; peft's LoRA layers are covered by the `nn.Linear` rule
on their `lora_A` / `lora_B` sub-layers. Any other module that owns parameters in scope (for example ViT's
`cls_token`, a custom RMSNorm) gets per-sample gradients from `torch.func` (`vmap` over samples of the module's
vector-Jacobian product with the captured output gradient), or from a loop over samples if `vmap` cannot trace
it. Per-sample gradients are materialised one layer at a time, in chunks of samples whose size is set by
`chunk_memory_mb`. A parameter that receives gradient through more than one module call (tied input/output
embeddings, shared layers) needs the sum of its per-sample contributions before squaring: its per-sample
gradients are kept until the backward pass is done, and batches are split so that this stash fits the same
memory bound.

Where: this module holds the entry points (`accumulate_fisher_sums`, `compute_fisher_diagonal`, `fisher_from_sums`);
`core.py` the engine that hooks the model and runs each micro-batch, `rules.py` the per-layer rules, `layout.py` the
checks that a module's calls are laid out by sample, `exact.py` the exact per-sample path, `objectives.py` the
log-likelihoods it differentiates, and `check.py` the self-check against per-sample autograd.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..errors import DeepCleanError, DeepCleanRunError
from .check import FisherCheck, check_fisher_engine
from .core import DEFAULT_CHUNK_MEMORY_MB, _FisherEngine
from .objectives import FISHER_TYPES, sample_log_likelihoods


__all__ = [
    "DEFAULT_CHUNK_MEMORY_MB",
    "FISHER_TYPES",
    "FisherDiagonal",
    "FisherReport",
    "accumulate_fisher_sums",
    "accumulator_bytes",
    "check_finite",
    "compute_fisher_diagonal",
    "fisher_from_sums",
    "sample_log_likelihoods",
]

FisherDiagonal = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module, accelerator: Accelerator | None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


@dataclass
class FisherReport:
    """What a Fisher pass did besides summing, filled in by `accumulate_fisher_sums(report=...)`.

    Attributes:
        exact_path: `{parameter: why}` for the parameters whose per-sample gradients came from the exact path (one
            pass of the whole model per sample) in at least one micro-batch.
        unused: parameters in scope that no sample's log-likelihood depends on (their Fisher is exactly zero).
        check: the self-check's result, with `check=True`.
    """

    exact_path: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    check: FisherCheck | None = None


def accumulate_fisher_sums(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
    chunk_memory_mb: float = DEFAULT_CHUNK_MEMORY_MB,
    first_index: int = 0,
    check: bool = False,
    check_rtol: float = 1e-4,
    report: FisherReport | None = None,
) -> tuple[FisherDiagonal, int]:
    """Sum over samples of the squared per-sample gradient of `log p(y|x)`, and the number of samples.

    Under several processes each rank sums over its own rows (`hf_deepclean.distributed.process_shard`: every row
    once, no repeats), then one SUM reduce gives every rank the global sums and count. With parameters sharded by
    FSDP2 every rank runs every row instead (the loader must be the same on all of them) and keeps its block of rows
    of each sum, in the parameter's layout (`hf_deepclean.sharding.row_block`); nothing is reduced.

    Args:
        model: the model, or what `accelerator.prepare` returned for it; it is run in eval mode.
        dataloader: yields dict batches with `labels` and the model's inputs.
        params: `{name: parameter}` to compute; default: all trainable parameters. Names are the unwrapped
            model's.
        fisher_type: `empirical` (dataset labels) or `true` (the model's predictive distribution: the exact
            expectation over classes for classification, one sampled label per token for token-level models).
        accelerator: gives the device, the process layout and the reduce; `None` for a single process.
        seed: seed of label sampling for the `true` Fisher of token-level models.
        desc: progress-bar label.
        chunk_memory_mb: bound on the memory that per-sample gradients of one layer (or of a tied parameter, for
            a whole batch) may take at once.
        first_index: index of the loader's first row in the whole data (this process's shard offset), so that
            labels sampled for the `true` Fisher are seeded per row as on one process.
        check: before the pass, compare the engine with per-sample autograd on 4 samples of the first batch
            (`check_fisher_engine`); a relative mismatch above `check_rtol` raises `DeepCleanRunError`. Its cost
            goes to `report`.
        check_rtol: the self-check's tolerance (loosen it under mixed precision, where the per-sample reference
            rounds differently).
        report: filled in place, if given: which parameters took the exact per-sample path and why, which ones no
            sample used, and the self-check's result.

    Returns:
        `(sums, count)`: float32 sums keyed by parameter name, and the global number of samples.
    """
    if fisher_type not in FISHER_TYPES:
        raise DeepCleanError(f"--fisher_type: got {fisher_type!r}; expected one of {', '.join(FISHER_TYPES)}.")
    if not (isinstance(chunk_memory_mb, int | float) and math.isfinite(chunk_memory_mb) and chunk_memory_mb > 0):
        raise DeepCleanError(f"--fisher_chunk_memory_mb: got {chunk_memory_mb!r}; expected a number > 0.")
    unwrapped = _unwrap(model, accelerator)
    if params is None:
        params = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
    if not params:
        raise DeepCleanError("--scope: no parameters in scope to compute a Fisher diagonal for.")
    engine = _FisherEngine(unwrapped, params, chunk_memory_mb)
    device = accelerator.device if accelerator is not None else next(iter(params.values())).device
    show_bar = accelerator.is_local_main_process if accelerator is not None else True
    was_training = unwrapped.training
    unwrapped.eval()
    count = 0
    batches = iter(dataloader)
    try:
        if check and engine.sharded:
            logger.warning(
                "Fisher self-check: skipped on FSDP-sharded weights (per-sample autograd would gather every weight); "
                "the engine's rules are those the check covers on unsharded models."
            )
        elif check:
            first = next(batches, None)
            if first is not None:
                first = {k: v.to(device) for k, v in first.items()}
                result = check_fisher_engine(
                    unwrapped, first, params, fisher_type, rtol=check_rtol, seed=seed, first_index=first_index
                )
                if report is not None:
                    report.check = result
                batches = itertools.chain([first], batches)
        with engine.attached():
            for batch in tqdm(batches, desc=desc, total=_length(dataloader), disable=not show_bar, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                engine.run_batch(batch, fisher_type, seed, first_index + count)
                count += next(iter(batch.values())).shape[0]
    finally:
        unwrapped.train(was_training)
    if report is not None:
        report.exact_path = {name: engine.exact_reasons[name] for name in sorted(engine.exact_reasons)}
        report.unused = engine.unused()
    sums = engine.sink.results()
    if accelerator is not None and accelerator.num_processes > 1 and not engine.sharded:
        sums = accelerator.reduce(sums, reduction="sum")
        count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum"))
    for name, total in sums.items():
        # the entries are >= 0 (or NaN), so their sum is finite exactly when all of them are
        if not math.isfinite(float(total.sum())):
            raise DeepCleanRunError(
                f"{desc}: the Fisher diagonal of {name!r} in module {engine.module_names.get(name, '?')} is not "
                "finite; expected finite gradients from the model of --model_name_or_path (check its weights, dtype "
                "and loss scale, and the data)."
            )
    return sums, count


def accumulator_bytes(params: Mapping[str, nn.Parameter]) -> dict[str, int]:
    """Memory of DeepClean's per-element state for `params`, whatever the model's dtype.

    Two float32 Fisher sums (forget and retain, 4 bytes each), the float32 ratio (4 bytes) and the bool selection
    mask (1 byte): 13 bytes per element in scope. (The repair adds AdamW's two float32 moments and an anchor copy
    for the parameters that have selected elements.)

    Returns:
        `{"params_in_scope", "fisher_sums", "ratio", "mask", "total"}`, the first a count, the others bytes.
    """
    numel = sum(p.numel() for p in params.values())
    return {"params_in_scope": numel, "fisher_sums": 8 * numel, "ratio": 4 * numel, "mask": numel, "total": 13 * numel}


def compute_fisher_diagonal(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    fisher_type: str = "empirical",
    accelerator: Accelerator | None = None,
    seed: int = 0,
    desc: str = "Fisher",
    chunk_memory_mb: float = DEFAULT_CHUNK_MEMORY_MB,
) -> FisherDiagonal:
    """Mean over samples of the squared per-sample gradient of `log p(y|x)`.

    The result does not depend on the batch size (up to float32 round-off).

    Args: as `accumulate_fisher_sums`.

    Returns:
        `{parameter name: float32 tensor}` with the shape of each parameter.

    Raises:
        DeepCleanError: if the dataloader yields no sample.
        DeepCleanRunError: if the result is not finite, naming the parameter and its module.
    """
    sums, count = accumulate_fisher_sums(
        model,
        dataloader,
        params=params,
        fisher_type=fisher_type,
        accelerator=accelerator,
        seed=seed,
        desc=desc,
        chunk_memory_mb=chunk_memory_mb,
    )
    return fisher_from_sums(sums, count, desc)


def fisher_from_sums(sums: FisherDiagonal, count: int, desc: str = "Fisher") -> FisherDiagonal:
    """The mean `sums / count`, checked.

    Raises:
        DeepCleanError: if `count` is 0 (no sample).
        DeepCleanRunError: if the result is not finite.
    """
    if count == 0:
        raise DeepCleanError(f"{desc}: the data set is empty; expected at least one sample.")
    fisher = {name: total / count for name, total in sums.items()}
    check_finite(fisher, desc)
    return fisher


def check_finite(fisher: FisherDiagonal, desc: str = "Fisher") -> None:
    """Refuse a Fisher diagonal with NaN or inf entries: a ratio built on it would select arbitrary weights."""
    for name, values in fisher.items():
        if not torch.isfinite(values).all():
            raise DeepCleanRunError(
                f"{desc}: the Fisher diagonal of {name!r} is not finite; expected finite gradients from the model of "
                "--model_name_or_path (check its weights, dtype and loss scale, and the data)."
            )


def _length(dataloader: Iterable) -> int | None:
    """The number of batches, for the progress bar, when the loader knows it."""
    try:
        return len(dataloader)
    except TypeError:
        return None
