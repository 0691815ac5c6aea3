"""`run_deepclean`: the method itself on a loaded model, the one function `hf-deepclean unlearn` and the benchmark share.

Fisher diagonals on the forget and retain rows -> ratio -> selection -> reset -> learning-rate probe -> masked repair.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from ..config import DEFAULT_MAX_RETAIN_SAMPLES, DeepCleanConfig
from ..data.collators import CausalLMCollator, Seq2SeqCollator, make_dataloader, subsample
from ..distributed import process_shard
from ..errors import DeepCleanError
from ..evaluation.metrics import preserved_random_state
from ..fisher.cache import CachedFisherSums, retain_sums_from_cache
from ..fisher.engine import FisherDiagonal, FisherReport, accumulate_fisher_sums, accumulator_bytes, fisher_from_sums
from ..hub.plots import fisher_ratio_histogram
from ..modeling import get_parameters_in_scope
from ..records import FisherRecord, RepairRecord, ResetRecord, StageTimer
from ..sharding import WholeTensors, any_process, any_sharded, is_sharded_model
from ..unlearning.forget_losses import forget_term
from ..unlearning.probe import PROBE_EVAL_ROWS, choose_repair_learning_rate, mean_loss, probe_needed
from ..unlearning.repair import build_repair_monitor, repair_selected_weights
from ..unlearning.reset import ResetMasks, reset_selected_weights
from ..unlearning.selection import (
    compute_fisher_ratio,
    reset_statistics,
    select_weights_to_reset,
    weigh_by_movement,
)
from ..unlearning.training import TrainingSchedule, optimizer_steps_per_epoch, train_model


logger = get_logger(__name__)

# `--reset base`: the base values of the selected parameters, given as they are or read once the selection is known
BaseValues = Mapping[str, torch.Tensor] | Callable[[list[str]], Mapping[str, torch.Tensor]]


@dataclass
class UnlearningRows:
    """The rows a DeepClean run reads, and how it batches them.

    Args:
        forget: the rows to forget.
        retain: the remaining training rows.
        held_out: held-out rows for the early-stopping check of `--early_stopping_criterion retain_and_mia` only;
            keep them apart from the held-out rows a run reports.
        collator: turns rows into model inputs with `labels`.
        batch_size: per-process batch size of the Fisher passes, the probe and the repair.
        seed: seed of shuffling, subsampling, fresh values and label sampling.
        max_retain_samples: the retain Fisher pass reads a seeded sample of at most this many rows (None: all).
    """

    forget: Dataset
    retain: Dataset
    held_out: Dataset | None
    collator: Callable
    batch_size: int = 32
    seed: int = 0
    max_retain_samples: int | None = DEFAULT_MAX_RETAIN_SAMPLES

    def loader(self, rows: Dataset, *, shuffle: bool = False, max_rows: int | None = None) -> DataLoader:
        """A plain DataLoader of (a seeded sample of at most `max_rows` of) `rows`."""
        return make_dataloader(
            subsample(rows, max_rows, self.seed), self.collator, self.batch_size, shuffle=shuffle, seed=self.seed
        )


@dataclass
class DeepCleanOutcome:
    """What `run_deepclean` did: the selection, and the records of its Fisher passes, reset and repair."""

    masks: ResetMasks
    reset: ResetRecord
    fisher: FisherRecord
    repair: RepairRecord
    ratio_histogram: dict


def run_deepclean(
    model: nn.Module,
    rows: UnlearningRows,
    config: DeepCleanConfig,
    accelerator: Accelerator,
    *,
    fisher_cache: CachedFisherSums | None = None,
    base_values: BaseValues | None = None,
    timer: StageTimer | None = None,
) -> DeepCleanOutcome:
    """Make `model` forget `rows.forget` with DeepClean, in place.

    Args:
        model: the model, on `accelerator.device`, as it is or prepared with `evaluation_mode=True`.
        rows: forget, retain and held-out rows with their collator, batch size and seed.
        config: the method's settings.
        accelerator: the run's Accelerator; under several processes every step is the same on every process.
        fisher_cache: sums over the whole training split (`hf-deepclean fisher`); the retain Fisher then comes
            from them at the cost of the forget pass only.
        base_values: `--reset base`: the base model's values, or a function of the selected parameter names
            that loads them; also the start values of `--selection_weighting movement`.
        timer: adds the time of each stage (`fisher_forget`, `fisher_retain`, `select_and_reset`, `load_base`,
            `probe_learning_rate`, `repair`).

    Returns:
        The selection and the records of the run.
    """
    timer = timer if timer is not None else StageTimer()
    config = concrete_config(config, base_known=base_values is not None, language_model=is_language_model(rows))
    params = get_parameters_in_scope(accelerator.unwrap_model(model), config.scope)
    sharded = any_sharded(params)
    if sharded:
        check_fsdp_settings(config, fisher_cache)
    fisher, fisher_record = compute_fisher_diagonals(model, rows, config, accelerator, params, fisher_cache, timer)
    repair_loader = rows.loader(rows.retain, shuffle=True)
    # built before the reset: the recovery target is the original model's retain accuracy; none without a repair
    watched = config.early_stopping and config.repair_epochs > 0
    monitor = build_monitor(model, rows, config, accelerator, repair_loader) if watched else None
    probe_rows = rows.loader(rows.retain, max_rows=PROBE_EVAL_ROWS)
    reference_loss = None
    if probe_needed(config):  # the probe weighs the reset's damage against the original model's loss
        with timer("probe_learning_rate"), preserved_random_state(accelerator):
            reference_loss = mean_loss(model, probe_rows, accelerator)
    values = None
    if config.selection_weighting != "none" or config.min_movement_quantile:
        with timer("load_base"):  # every parameter's start values, which the reset then reuses
            values = movement_start_values(base_values, params)
    with timer("select_and_reset"):
        ratios = compute_fisher_ratio(fisher["forget"], fisher["retain"], config.eps)
        if values is not None:
            ratios = weigh_by_movement(
                ratios,
                params,
                values,
                weighting=config.selection_weighting,
                min_movement_quantile=config.min_movement_quantile,
            )
        masks = select_on_every_process(ratios, config, accelerator, params)
    if config.reset == "base" and values is None:
        with timer("load_base"):
            values = resolve_base_values(base_values, masks)
    with timer("select_and_reset"):
        # the same seed on every process: the same fresh values everywhere
        init_fallback = reset_selected_weights(
            accelerator.unwrap_model(model), masks, reset=config.reset, seed=rows.seed, base_values=values
        )
    del values
    # FSDP: masks and ratios hold each process's rows; the records describe the whole model (gathered one at a time)
    whole_masks, whole_ratios = (
        (WholeTensors(masks, params), WholeTensors(ratios, params)) if sharded else (masks, ratios)
    )
    statistics = reset_statistics(whole_masks)
    ratio_histogram = fisher_ratio_histogram(whole_ratios, whole_masks)  # a summary for the card; ratios are freed
    del ratios
    logger.info(
        f"Reset {statistics.total.reset} of {statistics.total.numel} weights ({statistics.total.share:.2%}).",
        main_process_only=True,
    )
    with timer("probe_learning_rate"):
        learning_rate, probe = choose_repair_learning_rate(
            config,
            model,
            rows.loader(rows.retain, shuffle=True),
            probe_rows,
            accelerator,
            masks,
            reference_loss=reference_loss,
        )
    kept_steps = probe.kept_steps if probe is not None else 0
    with timer("repair"):
        schedule = TrainingSchedule.repair_budget(config, rows.batch_size, learning_rate)
        if kept_steps:  # the probe's trial at the chosen rate was the repair's first steps
            schedule = schedule.after_steps(kept_steps, optimizer_steps_per_epoch(repair_loader, accelerator))
        if config.forget_ascent_weight:  # DeepClean with forget ascent: L_retain + w forget term on the selection
            repair = train_model(
                model,
                repair_loader,
                accelerator,
                **schedule.optimizer_arguments(),
                masks=masks,
                should_stop=monitor,
                desc="Repair",
                ascent_dataloader=rows.loader(rows.forget, shuffle=True),
                ascent_weight=config.forget_ascent_weight,
                forget_term=forget_term(config.forget_loss),
            )
        else:
            repair = repair_selected_weights(
                model, masks, repair_loader, accelerator, **schedule.optimizer_arguments(), should_stop=monitor
            )
    return DeepCleanOutcome(
        masks=masks,
        reset=ResetRecord(
            mode=config.reset,
            selection_rule=config.selection_rule,
            selection_sha256=selection_fingerprint(whole_masks),
            statistics=statistics,
            init_fallback=init_fallback,
        ),
        fisher=fisher_record,
        repair=RepairRecord(
            **{**repair, "steps": repair["steps"] + kept_steps},
            learning_rate=learning_rate,
            learning_rate_probe=None if probe is None else {f"{rate:g}": loss for rate, loss in probe.losses.items()},
            learning_rate_probe_steps=None if probe is None else probe.steps,
            learning_rate_probe_start_loss=None if probe is None else probe.start_loss,
            learning_rate_probe_reference_loss=None if probe is None else probe.reference_loss,
            learning_rate_probe_kept_steps=None if probe is None else probe.kept_steps,
            early_stopping_target=None if monitor is None else monitor.target,
            early_stopping_checks=None if monitor is None else monitor.history,
        ),
        ratio_histogram=ratio_histogram,
    )


def compute_fisher_diagonals(
    model: nn.Module,
    rows: UnlearningRows,
    config: DeepCleanConfig,
    accelerator: Accelerator,
    params: Mapping[str, nn.Parameter],
    fisher_cache: CachedFisherSums | None,
    timer: StageTimer,
) -> tuple[dict[str, FisherDiagonal], FisherRecord]:
    """Fisher diagonals of the forget and retain rows (timed as `fisher_forget`, `fisher_retain`).

    With `fisher_cache`, the retain Fisher is `(S_all - S_forget) / (N - N_forget)` from the cached sums over the
    whole training split (or the cached sums themselves when the forget rows are a separate split).
    """
    options = {
        "params": params,
        "fisher_type": config.fisher_type,
        "accelerator": accelerator,
        "seed": rows.seed,
        "chunk_memory_mb": config.fisher_chunk_memory_mb,
    }
    forget_report, retain_report = FisherReport(), FisherReport()
    with timer("fisher_forget"):
        # each process sums over its shard, the engine reduces once; the self-check runs on the first pass only
        forget_sums, forget_count = fisher_sums_over(
            model,
            rows,
            rows.forget,
            desc="Fisher forget",
            check=config.fisher_check,
            check_rtol=fisher_check_tolerance(accelerator),
            report=forget_report,
            **options,
        )
    with timer("fisher_retain"):
        if fisher_cache is None:
            retain = subsample(rows.retain, rows.max_retain_samples, rows.seed)
            retain_sums, retain_count = fisher_sums_over(
                model, rows, retain, desc="Fisher retain", report=retain_report, **options
            )
        elif fisher_cache.covers_forget_rows:
            retain_sums, retain_count = retain_sums_from_cache(
                fisher_cache.sums, fisher_cache.info.count, forget_sums, forget_count
            )
        else:  # the forget rows are a separate split, not part of the cached one
            retain_sums, retain_count = fisher_cache.sums, fisher_cache.info.count
    fisher = {
        "forget": fisher_from_sums(forget_sums, forget_count, "Fisher forget"),
        "retain": fisher_from_sums(retain_sums, retain_count, "Fisher retain"),
    }
    check = forget_report.check
    passes = timer.seconds.get("fisher_forget", 0.0) + timer.seconds.get("fisher_retain", 0.0)
    record = FisherRecord(
        forget_samples=forget_count,
        retain_samples=retain_count,
        retain_source="pass" if fisher_cache is None else "cache",
        accumulator_bytes=accumulator_bytes(params),
        check=None
        if check is None
        else {**dataclasses.asdict(check), "share_of_fisher_passes": check.seconds / passes if passes else 0.0},
        exact_path={**retain_report.exact_path, **forget_report.exact_path},
        # unused by every pass that ran (with a cache, the forget pass alone)
        unused=sorted(
            set(forget_report.unused).intersection(*([retain_report.unused] if fisher_cache is None else []))
        ),
    )
    if record.exact_path:
        reason = next(iter(record.exact_path.values()))
        logger.info(
            f"Fisher: {len(record.exact_path)} parameter(s) took the exact per-sample path (e.g. {reason}).",
            main_process_only=True,
        )
    return fisher, record


def fisher_sums_over(
    model: nn.Module, rows: UnlearningRows, dataset: Dataset, *, accelerator: Accelerator, **options
) -> tuple[FisherDiagonal, int]:
    """Fisher sums over `dataset` and its row count; under several processes each one reads its own shard, except
    under FSDP, where every process reads every row and keeps its rows of the sums (`ShardedFisherAccumulator`)."""
    sharded = is_sharded_model(accelerator.unwrap_model(model))
    shard, first_index = (dataset, 0) if sharded else process_shard(dataset, accelerator)
    return accumulate_fisher_sums(
        model, rows.loader(shard), accelerator=accelerator, first_index=first_index, **options
    )


def check_fsdp_settings(config: DeepCleanConfig, fisher_cache: CachedFisherSums | None) -> None:
    """Refuse the settings that do not run on FSDP-sharded weights in this version."""
    if fisher_cache is not None:
        refuse_fisher_cache_under_fsdp()
    if config.selection_weighting != "none" or config.min_movement_quantile:
        raise DeepCleanError(
            "--selection_weighting/--min_movement_quantile: weighing by movement is not available under FSDP; "
            "expected --selection_weighting none and --min_movement_quantile 0."
        )
    if config.selection_scope == "per_layer" or config.forget_ascent_weight:
        raise DeepCleanError(
            "--selection_scope/--forget_ascent_weight: per-layer selection and the forget-ascent repair are not "
            "available under FSDP; expected --selection_scope global or per_parameter and --forget_ascent_weight 0."
        )


def refuse_fisher_cache_under_fsdp() -> None:
    raise DeepCleanError(
        "--fisher_cache: not available under FSDP in this version (the cache holds whole sums and whole-weight "
        "fingerprints); expected no --fisher_cache, or the run data parallel."
    )


def fisher_check_tolerance(accelerator: Accelerator) -> float:
    """The self-check's relative tolerance: 1e-4 in float32; 3e-2 under mixed precision, where the engine and the
    per-sample reference round differently (about 0.6% on bf16 autocast)."""
    return 1e-4 if accelerator.mixed_precision == "no" else 3e-2


def is_language_model(rows: UnlearningRows) -> bool:
    """Whether the rows are a language model's (causal or sequence-to-sequence): labels are tokens, not classes."""
    return isinstance(rows.collator, (CausalLMCollator, Seq2SeqCollator))


# the share of elements reset when neither --reset_fraction nor --gamma is given, for classifiers and for language
# models: 0.5 closed the most of the gap on the digits benchmark; on a language model it cost a quarter of TOFU's model
# utility, where 0.05 kept it within 5% and still met the forget-quality target (docs/decisions.md, 2026-11-26 and
# 2026-12-07)
RESET_FRACTIONS = {False: 0.5, True: 0.05}


def concrete_config(config: DeepCleanConfig, *, base_known: bool, language_model: bool) -> DeepCleanConfig:
    """`config` with its automatic defaults decided: `reset="auto"` is `base` when the base values are known, else
    `init`; `reset_fraction=None` (without `gamma`) is 0.5, or 0.05 for language models (causal or
    sequence-to-sequence); `early_stopping=None` is on for classifiers and off for language models, where it met
    TOFU's target less often (docs/decisions.md, 2026-12-07)."""
    changes = {}
    if config.reset == "auto":
        changes["reset"] = "base" if base_known else "init"
    if config.gamma is None and config.reset_fraction is None:
        changes["reset_fraction"] = RESET_FRACTIONS[language_model]
    if config.early_stopping is None:
        changes["early_stopping"] = not language_model
    return dataclasses.replace(config, **changes) if changes else config


def build_monitor(
    model: nn.Module, rows: UnlearningRows, config: DeepCleanConfig, accelerator: Accelerator, repair_loader
):
    """The early-stopping monitor of the repair (`--early_stopping`), built on the model before its reset."""
    monitored = {"retain": rows.retain}
    if config.early_stopping_criterion == "retain_and_mia":
        if rows.held_out is None:
            raise DeepCleanError(
                "--early_stopping_criterion: got 'retain_and_mia', which needs held-out rows (--eval_split); the "
                "dataset has none, expected --early_stopping_criterion retain."
            )
        monitored |= {"forget": rows.forget, "test": rows.held_out}
    return build_repair_monitor(
        model,
        original_model=model,
        rows=monitored,
        loader=lambda subset: make_dataloader(subset, rows.collator, rows.batch_size),
        accelerator=accelerator,
        tolerance=config.early_stopping_tolerance,
        criterion=config.early_stopping_criterion,
        steps_per_epoch=optimizer_steps_per_epoch(repair_loader, accelerator),
        seed=rows.seed,
        language_model=is_language_model(rows),
        perplexity_tolerance=config.early_stopping_perplexity_tolerance,
    )


def select_on_every_process(
    ratios: FisherDiagonal, config: DeepCleanConfig, accelerator: Accelerator, params: Mapping[str, nn.Parameter]
) -> ResetMasks:
    """The elements to reset (`select_weights_to_reset` with `config`), the same on every process.

    The ratios come from reduced sums, which every process receives identically; the masks are still broadcast
    from the main process, so that the selection, the reset and the repair act on the very same elements
    everywhere even if a device computed a ratio differently in its last bit. Under FSDP each process holds its
    rows of the ratios and gets the masks of those rows (the masks one process would select).
    """
    rules = {
        "gamma": config.gamma,
        "reset_fraction": config.reset_fraction,
        "max_reset_fraction": config.max_reset_fraction,
        "selection_scope": config.selection_scope,
    }
    if any_sharded(params):
        return select_weights_to_reset(ratios, params=params, **rules)
    masks = select_weights_to_reset(ratios, **rules)
    if accelerator.num_processes > 1:
        # as bytes: not every backend reduces or broadcasts bool tensors
        shared = broadcast({name: mask.to(torch.uint8) for name, mask in masks.items()}, from_process=0)
        masks = {name: shared[name].bool() for name in masks}
    return masks


def resolve_base_values(base_values: BaseValues | None, masks: ResetMasks) -> Mapping[str, torch.Tensor]:
    """`--reset base`: the base values of the selected parameters."""
    if base_values is None:
        raise DeepCleanError(
            "--reset: got 'base', but no base values to reset to; expected --base_model_name_or_path (or initial "
            "weights of the benchmark scenario), or --reset init or zero."
        )
    if callable(base_values):
        # under FSDP masks hold each process's rows: the names come from every process
        selected = any_process({name: bool(mask.any()) for name, mask in masks.items()})
        return base_values([name for name, chosen in selected.items() if chosen])
    return base_values


def movement_start_values(
    base_values: BaseValues | None, params: Mapping[str, nn.Parameter]
) -> Mapping[str, torch.Tensor]:
    """`--selection_weighting` / `--min_movement_quantile`: the values training started from, for every parameter in
    scope (the base model's, or the benchmark's initial weights)."""
    if base_values is None:
        raise DeepCleanError(
            "--selection_weighting/--min_movement_quantile: weigh by movement, but the values training started from "
            "are unknown; expected --base_model_name_or_path (a base model), or --selection_weighting none and "
            "--min_movement_quantile 0."
        )
    return base_values(list(params)) if callable(base_values) else base_values


def selection_fingerprint(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a selection: parameter names in order, each followed by its mask's shape and elements as bytes.

    Two runs selected the very same elements exactly when their fingerprints agree.
    """
    digest = hashlib.sha256()
    for name, mask in masks.items():
        digest.update(f"{name}:{tuple(mask.shape)}\n".encode())
        digest.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()
