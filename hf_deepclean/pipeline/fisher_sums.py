"""`hf-deepclean fisher`: Fisher sums over a whole training split, saved once so that later deletion requests on
the same checkpoint (`unlearn --fisher_cache`) cost one pass over their forget rows; and the check that refuses a
cache computed for anything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import DataArguments, DeepCleanConfig, ModelArguments
from ..data.forget import ForgetSelection
from ..errors import DeepCleanError
from ..fisher.cache import (
    CachedFisherSums,
    FisherCacheInfo,
    check_fisher_cache,
    load_fisher_sums,
    save_fisher_sums,
    weights_fingerprint,
)
from ..fisher.engine import fisher_from_sums
from ..modeling import get_parameters_in_scope
from ..records import StageTimer
from ..sharding import is_sharded_model
from .deepclean import fisher_check_tolerance, fisher_sums_over
from .session import DeepCleanSession


@dataclass
class FisherDataArguments(DataArguments):
    """The data of `hf-deepclean fisher`: as for `unlearn`, but `--forget` is optional (default: every row)."""

    forget_required: ClassVar[bool] = False
    forget: str | None = field(
        default=None,
        metadata={
            "help": "Sum over these rows of the training split only (a forget specification, as for `unlearn`); "
            "default: every row, the cache `unlearn --fisher_cache` takes."
        },
    )


@dataclass
class FisherOutputArguments:
    """Where `hf-deepclean fisher` writes the sums."""

    fisher_output: str = field(
        metadata={"help": "The .safetensors file to write the Fisher sums and their metadata to."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --fisher_output."})
    seed: int = field(default=42, metadata={"help": "Seed for `random:` row specs and label sampling."})

    def __post_init__(self):
        if not isinstance(self.fisher_output, str) or not self.fisher_output.endswith(".safetensors"):
            raise DeepCleanError(
                f"--fisher_output: got {self.fisher_output!r}; expected a path ending in .safetensors."
            )


FISHER_ARGUMENT_CLASSES = (ModelArguments, FisherDataArguments, DeepCleanConfig, FisherOutputArguments)


@dataclass
class FisherSumsResult:
    """What `compute_fisher_sums` wrote: the cache's description and the time of the pass."""

    info: FisherCacheInfo
    seconds: float


def fisher_cache_info(
    session: DeepCleanSession, config: DeepCleanConfig, indices: list[int] | None, count: int
) -> FisherCacheInfo:
    """What a cache of the session's model over `indices` of its training split (all rows if None) is keyed by."""
    split = session.data_args.train_split
    rows = ForgetSelection("cache", split, list(range(len(session.train_split))) if indices is None else indices)
    return FisherCacheInfo(
        weights_sha256=weights_fingerprint(session.unwrapped_model),
        dataset_fingerprint=session.train_split._fingerprint,
        split=split,
        rows_sha256=rows.sha256,
        num_rows=len(session.train_split),
        count=count,
        fisher_type=config.fisher_type,
        scope=config.scope,
    )


def load_checked_fisher_cache(session: DeepCleanSession, config: DeepCleanConfig) -> CachedFisherSums:
    """Read `config.fisher_cache` and refuse it unless it covers the session's weights and whole training split."""
    path = config.fisher_cache
    sums, info = load_fisher_sums(path)
    check_fisher_cache(info, fisher_cache_info(session, config, None, len(session.train_split)), path)
    return CachedFisherSums(sums, info, covers_forget_rows=not session.data.selection.is_separate_split)


def compute_fisher_sums(
    config: DeepCleanConfig,
    model_args: ModelArguments,
    data_args: DataArguments,
    fisher_args: FisherOutputArguments,
    accelerator: Accelerator | None = None,
) -> FisherSumsResult:
    """Compute the Fisher sums over the training split (or the rows of `--forget`) and save them.

    Returns:
        The cache's description (also stored in the file's metadata) and the time of the Fisher pass.
    """
    path, overwrite = fisher_args.fisher_output, fisher_args.overwrite_output_dir
    if Path(path).exists() and not overwrite:
        raise DeepCleanError(
            f"--fisher_output: {path!r} exists; pass --overwrite_output_dir to replace it, or choose another."
        )
    set_seed(fisher_args.seed)
    session = DeepCleanSession.load(
        model_args, data_args, seed=fisher_args.seed, batch_size=config.per_device_batch_size, accelerator=accelerator
    )
    if is_sharded_model(session.unwrapped_model):
        raise DeepCleanError(
            "hf-deepclean fisher: not available under FSDP in this version (the cache holds whole sums and "
            "whole-weight fingerprints); expected a data-parallel launch (torchrun, accelerate launch --multi_gpu)."
        )
    params = get_parameters_in_scope(session.unwrapped_model, config.scope)
    rows = "retain" if data_args.forget is None else "forget"
    if rows == "forget" and session.data.selection.is_separate_split:
        raise DeepCleanError("--forget: `split:` specs name another split; a cache covers rows of --train_split.")
    timer = StageTimer()
    with timer("fisher"):
        sums, count = fisher_sums_over(
            session.model,
            session.rows(),
            session.data.forget if rows == "forget" else session.data.retain,
            desc="Fisher",
            params=params,
            fisher_type=config.fisher_type,
            accelerator=session.accelerator,
            seed=fisher_args.seed,
            chunk_memory_mb=config.fisher_chunk_memory_mb,
            check=config.fisher_check,
            check_rtol=fisher_check_tolerance(session.accelerator),
        )
    fisher_from_sums(sums, count, "Fisher")  # refuses an empty or non-finite result
    info = fisher_cache_info(session, config, None if rows == "retain" else session.data.selection.indices, count)
    session.accelerator.wait_for_everyone()
    if session.accelerator.is_main_process:
        save_fisher_sums(path, sums, info, overwrite)
    return FisherSumsResult(info, timer.seconds["fisher"])
