"""Model card of a cleaned checkpoint: card data (front matter), the rendered Markdown and its plots.

The card and its plots are a pure function of the run's two records (`RunRecord`, `UnlearningResults`), which the
folder also holds as `deepclean_config.json` and `deepclean_results.json`, so a card can be re-rendered from an
output folder at any time (`save_model_card`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import FILE_BUILDERS, GENERATIVE_TASKS, DeepCleanConfig
from ..records import CARD_METRICS, REFERENCE_METRICS, RepairRecord, ResetRecord, RunRecord, UnlearningResults
from .plots import available_plots, save_plots


TEMPLATE_NAME = "deepclean_template.md"
CARD_TAGS = ["hf_deepclean", "machine-unlearning"]


def template_path() -> Path:
    """The card template: inside the installed package, or the repository's `model_cards/` in a source tree."""
    packaged = resources.files("hf_deepclean") / "model_cards" / TEMPLATE_NAME
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME


def hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id, else `None` (local folders and file builders such as `csv` are not)."""
    if not name or Path(name).exists() or name in FILE_BUILDERS:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def display_name(name: str) -> str:
    """How the card names a model or dataset: its Hub id, or the folder name of a local path (never its location)."""
    if hub_id_or_none(name) is not None or name in FILE_BUILDERS:
        return name
    return f"{Path(name).name} (local folder)"


def metric_split(metric: str, dataset: Mapping[str, Any]) -> str:
    """The split a metric was measured on: forget rows, retained training rows, or the held-out split."""
    if metric.startswith("forget_"):
        return dataset.get("forget_split") or dataset["train_split"]
    if metric.startswith("retain_"):
        return dataset["train_split"]
    return dataset.get("eval_split") or dataset["train_split"]


def format_results_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table with one column per model (`before`, `after`, optionally `reference`)."""
    columns = [name for name in ("before", "after", "reference") if metrics.get(name)]
    header = "| Metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    rows = []
    for key in CARD_METRICS:
        if any(key in metrics[c] for c in columns):
            cells = [f"{metrics[c][key]:.4f}" if key in metrics[c] else "" for c in columns]
            rows.append(f"| {key} | " + " | ".join(cells) + " |")
    if "avg_gap" in metrics.get("after", {}):
        cells = [f"{metrics[c]['avg_gap']:.2f} pp" if "avg_gap" in metrics[c] else "" for c in columns]
        rows.append("| avg_gap to reference | " + " | ".join(cells) + " |")
    return header + "\n".join(rows)


# how the card names the figures measured against a reference model, and what they read
REFERENCE_FIGURES = {
    "forget_quality": "forget quality (TOFU: KS-test p-value of the truth ratios on the forget questions)",
    "model_utility": "model utility (TOFU: harmonic mean of probability, ROUGE-L recall, truth ratio; retain questions)",
    "privleak": "PrivLeak (MUSE: relative AUC difference of a Min-K% Prob attack, forget vs held-out rows)",
}


def results_columns(results: UnlearningResults) -> dict[str, dict[str, float]]:
    """The results table's columns: `before`, `after` and, with a reference, `reference`; a classifier's gap to the
    reference (`avg_gap`) joins the first two."""
    columns = {"before": dict(results.metrics_before), "after": dict(results.metrics_after)}
    reference = results.reference
    if reference is not None:
        columns["reference"] = dict(reference.metrics)
        for name in ("before", "after"):
            if "avg_gap" in getattr(reference, name):
                columns[name]["avg_gap"] = getattr(reference, name)["avg_gap"]
    return columns


def reference_section(config: RunRecord, results: UnlearningResults) -> str:
    """The card's paragraph on the reference model: which model and revision the comparison used and, for a language
    model, its forget quality, model utility and PrivLeak; for a language model without a reference, that these were
    not measured. Empty for a classifier without a reference."""
    reference = results.reference
    language_model = config.model.task in GENERATIVE_TASKS
    if reference is None:
        if not language_model:
            return ""
        return (
            "Forget quality, model utility (TOFU) and PrivLeak (MUSE) were not measured: they compare with a model "
            "retrained without the forget rows, and this run was given none (`--reference_model`)."
        )
    lines = [
        f"Reference model: {display_name(reference.model)} (revision `{reference.revision}`), a model retrained "
        "without the forget rows; the `reference` column above is its own."
    ]
    measured = [name for name in REFERENCE_METRICS if name in reference.after]
    if measured:
        lines += ["", "| Against the reference | before | after | reference |", "|---|---|---|---|"]
        for name in measured:
            cells = [getattr(reference, column).get(name) for column in ("before", "after", "metrics")]
            texts = ["" if value is None else f"{value:.4g}" for value in cells]
            lines.append(f"| {REFERENCE_FIGURES[name]} | " + " | ".join(texts) + " |")
        lines += [
            "",
            "Forget quality near 1: the cleaned model's truth ratios are distributed as the reference's (TOFU reads "
            "p > 0.05 as forgetting that matches retraining). Model utility should stay at the original's. PrivLeak "
            "near 0: the forget rows stand out as much as for the reference; positive means under-, negative "
            "over-unlearning.",
        ]
        counts = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in reference.rows.items())
        if counts:
            lines[-1] += f" Read: {counts}."
    for name, reason in reference.not_measured.items():
        lines += ["", f"Not measured: {name} ({reason})."]
    return "\n".join(lines)


# arguments outside DeepCleanConfig that change what the procedure computes
PROCEDURE_ARGUMENTS = ("max_retain_samples", "max_eval_samples", "max_length", "seed")


def hyperparameters(config: RunRecord) -> list[tuple[str, Any]]:
    """Every method hyperparameter as recorded (all `DeepCleanConfig` fields), then the other settings that shape
    the procedure, the number of processes and, under FSDP, the sharding."""
    args = config.arguments
    names = [f.name for f in fields(DeepCleanConfig)] + list(PROCEDURE_ARGUMENTS)
    # a path-valued setting (a cache file, say) is named by its last part only, like the model and data folders
    rows = [
        (name, display_name(args[name]) if isinstance(args[name], str) and "/" in args[name] else args[name])
        for name in names
        if name in args
    ]
    sharding = [("sharding", config.sharding)] if config.sharding != "none" else []
    return [*rows, ("num_processes", config.num_processes), *sharding]


def summary_lines(config: RunRecord, results: UnlearningResults) -> list[str]:
    """The card's summary bullets: what was forgotten, how much of the model changed, and the headline metrics."""
    total, forget = results.reset.statistics.total, config.forget
    before, after = results.metrics_before, results.metrics_after
    lines = [
        f"Forgotten: {forget.num_rows} rows of split `{forget.split}` ({forget.kind} specification).",
        f"Changed: {total.share:.2%} of the weights ({total.reset} of {total.numel}) were reset and "
        "repaired; every other weight is bit-for-bit the original.",
    ]
    for key, text in (
        ("forget_accuracy", "Accuracy on the forgotten rows"),
        ("retain_accuracy", "Accuracy on the retained rows"),
        ("test_accuracy", "Accuracy on held-out rows"),
        ("forget_perplexity", "Perplexity on the forgotten rows"),
        ("retain_perplexity", "Perplexity on the retained rows"),
        ("mia_auc", "Membership-attack AUC, forgotten vs held-out rows"),
        ("canary_exposure", "Exposure of the planted canaries, in bits"),
    ):
        if key in before and key in after:
            lines.append(f"{text}: {before[key]:.3f} before, {after[key]:.3f} after.")
    if "canary_exposure_unseen" in after:
        lines.append(
            f"Exposure of never-seen canaries of the same format (the level of a secret the model never saw): "
            f"{after['canary_exposure_unseen']:.3f} bits, out of at most {after['canary_exposure_max']:.3f}."
        )
    return lines


def reset_description(args: Mapping[str, Any], reset: ResetRecord) -> str:
    """What the selected weights were reset to (`--reset`, as the run resolved `auto`), as the card's procedure
    says it."""
    if reset.mode == "zero":
        return "zero"
    if reset.mode != "base":
        return "freshly initialised values"
    base = reset.base_model or args["base_model_name_or_path"]
    revision = reset.base_model_revision or args.get("base_model_revision", "main")
    text = (
        f"the values of the base model {display_name(base)} (revision {revision}), the checkpoint the fine-tuning "
        "started from (`--reset base`)"
    )
    fallback = reset.init_fallback
    if fallback:
        text += (
            f"; {len(fallback)} selected parameter tensor(s) that the base model lacks (such as a new head) got "
            f"freshly initialised values instead: {', '.join(f'`{name}`' for name in fallback[:10])}"
            f"{', ...' if len(fallback) > 10 else ''}"
        )
    return text


# this library's task names where the Hub's pipeline tags differ
HUB_PIPELINE_TAGS = {"causal-lm": "text-generation", "seq2seq-lm": "text2text-generation"}


# the rows each figure against a reference reads: forget questions, retain questions, forget rows against held-out ones
REFERENCE_METRIC_ROWS = {"forget_quality": "forget", "model_utility": "retain", "privleak": "forget"}


def reference_eval_results(
    results: UnlearningResults, common: Mapping[str, Any], dataset: Mapping[str, Any]
) -> list[EvalResult]:
    """`model-index` entries of the figures measured against the reference model (forget quality, model utility,
    PrivLeak), with the reference named in each entry's `args`; none without a reference."""
    reference = results.reference
    if reference is None:
        return []
    against = {"reference_model": display_name(reference.model), "reference_revision": reference.revision}
    return [
        EvalResult(
            **common,
            dataset_split=metric_split(f"{REFERENCE_METRIC_ROWS[name]}_", dataset),
            metric_type=name,
            metric_name=f"{name} (against the reference model)",
            metric_value=round(float(reference.after[name]), 6),
            metric_args=against,
        )
        for name in REFERENCE_METRICS
        if name in reference.after
    ]


def build_card_data(config: RunRecord, results: UnlearningResults) -> ModelCardData:
    """Front matter: base model, datasets, tags and `model-index` results of the cleaned model."""
    args, dataset = config.arguments, config.dataset
    task = HUB_PIPELINE_TAGS.get(config.model.task, config.model.task)
    dataset_id = hub_id_or_none(args["dataset_name"])
    common = {
        "task_type": task,
        "dataset_type": dataset_id or Path(args["dataset_name"]).name,
        "dataset_name": display_name(args["dataset_name"]),
        "dataset_config": args.get("dataset_config_name"),
        "dataset_revision": args.get("dataset_revision"),
    }
    eval_results = [
        EvalResult(
            **common,
            dataset_split=metric_split(name, dataset),
            metric_type=name,
            metric_name=name,
            metric_value=round(float(value), 6),
        )
        for name, value in results.metrics_after.items()
        if name in CARD_METRICS
    ]
    eval_results += reference_eval_results(results, common, dataset)
    # The Hub only accepts repo ids in `base_model`/`datasets`; local folders are named in the card's body instead.
    return ModelCardData(
        base_model=hub_id_or_none(args["model_name_or_path"]),
        datasets=[dataset_id] if dataset_id else None,
        tags=list(CARD_TAGS),
        # an adapter folder is loaded with peft; a merged or full model with transformers alone
        library_name="peft" if args.get("adapter_name_or_path") and not args.get("merge_adapter") else "transformers",
        pipeline_tag=task,
        model_name=args.get("hub_model_id") or Path(args["output_dir"]).name or "cleaned-model",
        eval_results=eval_results,
    )


def render_model_card(config: RunRecord, results: UnlearningResults) -> ModelCard:
    """Render the card from the run's records.

    The card embeds the plots `save_model_card` writes next to it (those the results have data for).
    """
    args, dataset, forget = config.arguments, config.dataset, config.forget
    reset = results.reset
    total = reset.statistics.total
    shares = reset.statistics.per_module()
    top_modules = sorted(shares.items(), key=lambda item: -item[1])[:10]
    card_data = build_card_data(config, results)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=card_data.model_name,
        summary=summary_lines(config, results),
        base_model=display_name(args["model_name_or_path"]),
        base_revision=args["revision"],
        task=config.model.task,
        architecture=config.model.architecture,
        dataset_name=display_name(args["dataset_name"]),
        dataset_config_name=args.get("dataset_config_name"),
        dataset_revision=args.get("dataset_revision"),
        train_split=dataset["train_split"],
        train_rows=dataset["num_rows"]["train"],
        eval_split=dataset.get("eval_split"),
        test_rows=dataset["num_rows"]["test"],
        forget_rows=forget.num_rows,
        forget_split=forget.split,
        forget_kind=forget.kind,
        forget_sha256=forget.sha256,
        retain_fisher_rows=results.fisher.retain_samples,
        fisher_type=args["fisher_type"],
        scope=args["scope"],
        eps=args["eps"],
        selection_rule=reset.selection_rule,
        max_reset_fraction=args["max_reset_fraction"],
        reset_share=f"{total.share:.2%}",
        reset_count=total.reset,
        reset_numel=total.numel,
        reset_description=reset_description(args, reset),
        repair_epochs=args["repair_epochs"],
        learning_rate=repair_learning_rate_text(results.repair),
        weight_decay=args["weight_decay"],
        lr_scheduler_type=args["lr_scheduler_type"],
        warmup_ratio=args["warmup_ratio"],
        max_grad_norm=args["max_grad_norm"],
        repair_steps=results.repair.steps,
        batch_size=args["per_device_batch_size"],
        num_processes=config.num_processes,
        seed=args["seed"],
        hyperparameters=hyperparameters(config),
        top_modules=[(module, f"{share:.2%}") for module, share in top_modules],
        num_modules=len(shares),
        results_table=format_results_table(results_columns(results)),
        reference_section=reference_section(config, results),
        plots=available_plots(results),
        timings=", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in results.timings.items()),
        versions=sorted(config.library_versions.items()),
        warnings=results.warnings,
    )


def repair_learning_rate_text(repair: RepairRecord) -> str:
    """The repair's learning rate as the card states it."""
    if repair.learning_rate_probe == {}:
        return (
            f"{repair.learning_rate:g} (the probe's smallest candidate, without trials: the reset barely raised the "
            "retain loss)"
        )
    if repair.learning_rate_probe is not None:
        return f"{repair.learning_rate:g} (chosen by the learning-rate probe)"
    return "none (no repair)" if repair.learning_rate is None else f"{repair.learning_rate:g}"


def save_model_card(folder: str | os.PathLike, config: RunRecord, results: UnlearningResults) -> ModelCard:
    """Write the card as `README.md` and its plots as PNG files into `folder`.

    Args:
        folder: the output folder (or its staging copy).
        config: the run's `deepclean_config.json` record.
        results: its `deepclean_results.json` record.

    Returns:
        The rendered card.
    """
    folder = Path(folder)
    save_plots(results, folder)
    card = render_model_card(config, results)
    card.save(folder / "README.md")
    return card
