"""`unlearn`: what `hf-deepclean unlearn` runs, top to bottom.

load -> evaluate before -> DeepClean (Fisher forget and retain, select + reset, repair) -> evaluate after
-> save the folder with its card -> push to the Hub.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import PretrainedConfig

from ..config import (
    DataArguments,
    DeepCleanConfig,
    ModelArguments,
    OutputArguments,
    arguments_to_dict,
)
from ..data.forget import parse_forget_spec, redact_forget_spec
from ..errors import DeepCleanError, DeepCleanRunError
from ..hub.model_card import save_model_card
from ..hub.output import CONFIG_NAME, RESULTS_NAME, atomic_output_dir, check_output_dir
from ..hub.plots import loss_histograms
from ..hub.push import check_hub_token, push_output_dir
from ..modeling import get_parameters_in_scope, merge_adapter
from ..records import ForgetRecord, ModelRecord, ReferenceRecord, RunRecord, StageTimer, UnlearningResults, to_json
from ..sharding import full_state_dict, is_sharded_model
from ..unlearning.repair import MONITOR_ROWS
from ..unlearning.reset import ResetMasks
from .assessment import ReferenceMeasures, compare_with_reference, measure_questions, measure_reference
from .deepclean import concrete_config, is_language_model, refuse_fisher_cache_under_fsdp, run_deepclean
from .fisher_sums import load_checked_fisher_cache
from .session import DeepCleanSession, checked_accelerator, library_versions, resolve_reset


logger = get_logger(__name__)


@dataclass
class UnlearningRun:
    """What `unlearn` returns."""

    results: UnlearningResults
    session: DeepCleanSession
    masks: ResetMasks


def unlearn(
    config: DeepCleanConfig,
    model_args: ModelArguments,
    data_args: DataArguments,
    output_args: OutputArguments,
    accelerator: Accelerator | None = None,
) -> UnlearningRun:
    """Make a trained model forget rows of its training data with DeepClean, and write the cleaned checkpoint.

    Args:
        config: the method's settings.
        model_args: the model to clean.
        data_args: its training data and the forget specification.
        output_args: output folder, seed, adapter merging and Hub publishing.
        accelerator: an existing Accelerator (`default_accelerator()` otherwise). Under FSDP version 2 the weights
            and DeepClean's state are sharded across processes; DeepSpeed and tensor parallelism are refused.

    Returns:
        The results (also written as `deepclean_results.json`), the session holding the cleaned model, and the
        selected elements (the same on every process).
    """
    check_output_dir(output_args.output_dir, output_args.overwrite_output_dir)
    if output_args.push_to_hub:
        check_hub_token()
    if output_args.merge_adapter and model_args.adapter_name_or_path is None:
        raise DeepCleanError("--merge_adapter: needs --adapter_name_or_path (there is no adapter to merge).")
    accelerator = checked_accelerator(accelerator)
    set_seed(output_args.seed)
    timer = StageTimer()
    with timer("load"):
        session, run_config, base_config = load_session(config, model_args, data_args, output_args.seed, accelerator)
        if config.fisher_cache is not None and is_sharded_model(session.unwrapped_model):
            refuse_fisher_cache_under_fsdp()
        fisher_cache = load_checked_fisher_cache(session, config) if config.fisher_cache is not None else None
    reference = questions_before = None
    if output_args.reference_model is not None:
        with timer("evaluate_reference"):  # measured and freed before the unlearning
            reference = measure_reference(session, output_args.reference_model, output_args.reference_revision)
            questions_before = measure_questions(session, session.model)
    with timer("evaluate_before"):
        before, outputs_before = session.evaluate(prefix="before ", return_outputs=True)
    outcome = run_deepclean(
        session.model,
        session.rows(),
        run_config,
        accelerator,
        fisher_cache=fisher_cache,
        base_values=partial(session.load_base_values, base_config=base_config) if base_config else None,
        timer=timer,
    )
    with timer("evaluate_after"):
        after, outputs_after = session.evaluate(prefix="after ", return_outputs=True)
    if run_config.reset == "base":
        outcome.reset.base_model = session.model_args.base_model_name_or_path
        outcome.reset.base_model_revision = session.model_args.base_model_revision
    results = UnlearningResults(
        metrics_before=before,
        metrics_after=after,
        reset=outcome.reset,
        fisher=outcome.fisher,
        repair=outcome.repair,
        timings={**timer.seconds, "unlearning": timer.unlearning_seconds()},
        ratio_histogram=outcome.ratio_histogram,
        loss_histograms=loss_histograms({"before": outputs_before, "after": outputs_after}),
        # each row once, whatever the number of processes (`gather_for_metrics` drops Accelerate's repeats)
        evaluated_rows={split: len(values["loss"]) for split, values in outputs_after.items()},
        warnings=damage_warnings(run_config, before, after, kept_test_rows(session, outputs_before, outputs_after)),
    )
    if reference is not None:
        with timer("evaluate_reference"):
            results.reference = reference_record(
                session, reference, (before, outputs_before, questions_before), (after, outputs_after)
            )
        results.timings["evaluate_reference"] = timer.seconds["evaluate_reference"]
    # under FSDP every process sends its rows of the weights to the main one (a collective), which writes them
    state_dict = full_state_dict(session.unwrapped_model) if is_sharded_model(session.unwrapped_model) else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with timer("save"):
            record = run_record(session, model_args, config, output_args)
            save_output(session, record, results, output_args, state_dict=state_dict)
        results.timings["save"] = timer.seconds["save"]
        if output_args.push_to_hub:
            results.hub_commit_url = push_output_dir(
                output_args.output_dir,
                output_args.hub_model_id,
                private=output_args.hub_private_repo,
                revision=output_args.hub_revision,
            ).commit_url
    return UnlearningRun(results, session, outcome.masks)


def load_session(
    config: DeepCleanConfig, model_args: ModelArguments, data_args: DataArguments, seed: int, accelerator: Accelerator
) -> tuple[DeepCleanSession, DeepCleanConfig, PretrainedConfig | None]:
    """Load the session, and decide the settings left to the run: the reset mode (`auto`), whether the repair stops
    early, and which held-out rows its check may use. Returns the session, the run's config and the base's config."""
    reset, model_args, base_config = resolve_reset(config.reset, model_args, accelerator)
    session = DeepCleanSession.load(
        model_args, data_args, seed=seed, batch_size=config.per_device_batch_size, accelerator=accelerator
    )
    get_parameters_in_scope(session.unwrapped_model, config.scope)  # an empty scope is refused before any work
    run_config = concrete_config(
        dataclasses.replace(config, reset=reset),
        base_known=base_config is not None,
        language_model=is_language_model(session.rows()),
    )
    if run_config.early_stopping and run_config.early_stopping_criterion == "retain_and_mia":
        session.reserve_monitor_rows(MONITOR_ROWS)
    return session, run_config, base_config


def reference_record(
    session: DeepCleanSession, reference: ReferenceMeasures, before: tuple, after: tuple
) -> ReferenceRecord:
    """The comparison with the reference of the original (`before`: metrics, outputs and question scores) and of the
    cleaned model (`after`: metrics and outputs; its question scores are measured here)."""
    after = (*after, measure_questions(session, session.model))
    rows = {f"{split}_questions": len(scores["answer_log_prob"]) for split, scores in after[2].items()}
    return reference.record(*(compare_with_reference(reference, *measured) for measured in (before, after)), rows)


def damage_warnings(
    config: DeepCleanConfig,
    before: dict[str, float],
    after: dict[str, float],
    kept_test_rows: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[str]:
    """Warn (and return the warnings, which the results and the card keep) when the cleaned model's retain or
    held-out accuracy fell more than `config.max_accuracy_drop` below the original's, or for a language model its
    retain or held-out perplexity rose more than `config.max_perplexity_rise` above it, and say what helps.

    Args:
        config: the run's settings.
        before, after: the metrics of the original and of the cleaned model.
        kept_test_rows: when a whole class was forgotten, `(correct before, correct after)` on the held-out rows of
            the classes the model keeps: the forgotten class's held-out rows are meant to be lost.
    """
    accuracies = {name: (before[name], after[name]) for name in ("retain_accuracy", "test_accuracy") if name in after}
    if kept_test_rows is not None and "test_accuracy" in accuracies:
        del accuracies["test_accuracy"]
        if len(kept_test_rows[0]):
            accuracies["test_accuracy of the kept classes"] = tuple(float(rows.mean()) for rows in kept_test_rows)
    warnings = [
        f"{name} fell from {old:.3f} to {new:.3f}, more than the tolerated {config.max_accuracy_drop:g} "
        "(--max_accuracy_drop)"
        for name, (old, new) in accuracies.items()
        if old - new > config.max_accuracy_drop
    ]
    perplexities = {
        name: (before[name], after[name]) for name in ("retain_perplexity", "test_perplexity") if name in after
    }
    warnings += [
        f"{name} rose from {old:.3f} to {new:.3f}, more than the tolerated {config.max_perplexity_rise:.0%} "
        "(--max_perplexity_rise)"
        for name, (old, new) in perplexities.items()
        if math.isfinite(old) and not new <= old * (1 + config.max_perplexity_rise)  # a NaN after too
    ]
    if warnings:
        hint = (
            "for a fine-tuned pretrained model, pass --base_model_name_or_path BASE (the selected weights then go back "
            "to the pretrained ones)"
            if config.reset != "base" and config.scope != "adapter"  # an adapter's base values are its initialisation
            else "try a smaller --reset_fraction or more --repair_epochs"
        )
        logger.warning(
            f"The cleaned model is damaged: {'; '.join(warnings)}. The repair did not rebuild what the reset "
            f"removed; {hint}. The model card says so.",
            main_process_only=True,
        )
    return warnings


def kept_test_rows(session: DeepCleanSession, before: dict, after: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """`(correct before, correct after)` on the held-out rows of the kept classes, when some class was forgotten
    whole (see `damage_warnings`); None otherwise."""
    kept = session.kept_class_rows()
    if kept is None or kept.all() or "test" not in before:
        return None
    return before["test"]["correct"][kept], after["test"]["correct"][kept]


def run_record(
    session: DeepCleanSession, model_args: ModelArguments, config: DeepCleanConfig, output_args: OutputArguments
) -> RunRecord:
    """What `deepclean_config.json` holds: every argument as given, versions, the data's identity, and the forget set
    as a count and a hash (never its content)."""
    data_args = session.data_args
    arguments = arguments_to_dict(model_args, data_args, config, output_args)
    arguments["forget"] = redact_forget_spec(data_args.forget)
    selection = session.data.selection
    return RunRecord(
        arguments=arguments,
        model=ModelRecord(
            name_or_path=model_args.model_name_or_path,
            revision=model_args.revision,
            task=session.task,
            architecture=type(session.unwrapped_model).__name__,
        ),
        dataset=session.data.info,
        forget=ForgetRecord(
            kind=parse_forget_spec(data_args.forget).kind,
            split=selection.split,
            num_rows=selection.num_rows,
            sha256=selection.sha256,
        ),
        seed=output_args.seed,
        num_processes=session.accelerator.num_processes,
        sharding="fsdp2" if is_sharded_model(session.unwrapped_model) else "none",
        library_versions=library_versions(),
        canaries=session.canaries.record() if session.canaries is not None else None,
    )


def save_output(
    session: DeepCleanSession,
    record: RunRecord,
    results: UnlearningResults,
    output_args: OutputArguments,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model, processor, card and json reports to `output_args.output_dir`, atomically; `state_dict`: the
    whole weights of a model sharded with FSDP2 (`hf_deepclean.sharding.full_state_dict`)."""
    model = session.unwrapped_model
    if output_args.merge_adapter:
        # merging rewrites the base layers in place: from here on the session's model is the merged one
        model = session.model = merge_adapter(model)
    output_dir = output_args.output_dir
    try:
        with atomic_output_dir(output_dir, output_args.overwrite_output_dir) as staging:
            model.save_pretrained(staging, state_dict=state_dict)
            session.processor.save_pretrained(staging)
            (staging / CONFIG_NAME).write_text(to_json(record))
            (staging / RESULTS_NAME).write_text(to_json(results))
            save_model_card(staging, record, results)
    except OSError as error:  # a full disk, a folder removed under the run: the run failed, the input was fine
        raise DeepCleanRunError(
            f"--output_dir: could not write {output_dir!r} ({error.strerror or error}); nothing was written, "
            "expected a folder with room for the model."
        ) from error
    logger.info(f"Saved the cleaned model to {output_dir}", main_process_only=True)
    return Path(output_dir)


class DeepCleanUnlearner:
    """Make a trained model forget rows of its training data with DeepClean (`unlearn` with these arguments).

    Args:
        config: the method's hyperparameters.
        model_args: which model to clean.
        data_args: its training data and the forget specification.
        output_args: output folder and seed.
        accelerator: an existing `Accelerator` (`default_accelerator()` otherwise).

    The same run works on several processes (`torchrun`, `accelerate launch`): Fisher passes are sharded and reduced,
    the selection (kept as `masks` after `run()`) is the same on every process, the repair is data parallel, and
    only the main process writes and pushes.

    Example:
        ```python
        from hf_deepclean import DataArguments, DeepCleanConfig, DeepCleanUnlearner, ModelArguments, OutputArguments

        results = DeepCleanUnlearner(
            DeepCleanConfig(),
            ModelArguments("my-org/my-classifier"),
            DataArguments("my-org/my-data", forget="class:3"),
            OutputArguments("cleaned"),
        ).run()
        print(results.metrics_after["forget_accuracy"])
        ```
    """

    def __init__(
        self,
        config: DeepCleanConfig,
        model_args: ModelArguments,
        data_args: DataArguments,
        output_args: OutputArguments,
        accelerator: Accelerator | None = None,
    ):
        self.config = config
        self.model_args = model_args
        self.data_args = data_args
        self.output_args = output_args
        self.accelerator = accelerator
        self.session: DeepCleanSession | None = None  # the loaded model and data, after `run()`
        self.masks: ResetMasks | None = None  # the elements `run()` selected and reset

    def run(self) -> UnlearningResults:
        """Run the pipeline and write the output folder; returns the results record."""
        run = unlearn(self.config, self.model_args, self.data_args, self.output_args, self.accelerator)
        self.session, self.masks, self.accelerator = run.session, run.masks, run.session.accelerator
        return run.results
