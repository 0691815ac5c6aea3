"""The benchmark's report: aggregates over seeds, Markdown tables, one plot per scenario.

Classifier scenarios get accuracy, attacks, `avg_gap` and `gap_closed`; the causal-LM (facts) scenarios get TOFU's
forget quality and model utility, MUSE's PrivLeak, the membership attacks and perplexity, and a plot of forget quality
(log scale) against model utility, the figure LLM-unlearning papers show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from ..hub.output import atomic_output_dir
from ..records import SUMMARY_METRICS, to_json
from .lm_evaluation import FORGET_QUALITY_THRESHOLD


# figures of a run beside its metrics (`avg_gap` and `gap_closed` on classifier scenarios only)
RUN_FIGURES = ("avg_gap", "gap_closed", "seconds", "time_share_of_retrain")
# the columns of a causal-LM scenario's table, after forget quality and model utility
LANGUAGE_MODEL_COLUMNS = (
    "forget_rouge_l",
    "forget_truth_ratio",
    "privleak",
    "mia_auc",
    "mia_zlib_auc",
    "mia_min_k_auc",
    "mia_min_k_plus_plus_auc",
    "retain_perplexity",
)
ATTACK_AUCS = ("mia_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc")


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and standard deviation over seeds of every metric, avg_gap, gap_closed and time, per scenario and method;
    with forget quality, also how many seeds reach TOFU's threshold (`forget_quality_passed`)."""
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for run in runs:
        grouped.setdefault(run["scenario"], {}).setdefault(run["method"], []).append(run)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario, methods in grouped.items():
        summary[scenario] = {}
        for method, method_runs in methods.items():
            values: dict[str, list[float]] = {}
            for run in method_runs:
                for key, value in run["metrics"].items():
                    values.setdefault(key, []).append(value)
                for key in RUN_FIGURES:
                    if key in run:
                        values.setdefault(key, []).append(run[key])
            summary[scenario][method] = {
                "seeds": len(method_runs),
                "mean": {key: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for key, v in values.items()},
                "std": {key: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan for key, v in values.items()},
            }
            stages: dict[str, list[float]] = {}
            for run in method_runs:
                for stage, seconds in run.get("stage_seconds", {}).items():
                    stages.setdefault(stage, []).append(seconds)
            if stages:  # DeepClean's time by stage, mean over seeds
                summary[scenario][method]["stage_seconds"] = {stage: float(np.mean(v)) for stage, v in stages.items()}
            repairs = [{"seed": run["seed"], **run["repair"]} for run in method_runs if "repair" in run]
            if repairs:  # DeepClean's repair, per seed: rate, steps, early stop, probe
                summary[scenario][method]["repairs"] = repairs
            if "forget_quality" in values:
                passed = int(np.sum(np.asarray(values["forget_quality"]) >= FORGET_QUALITY_THRESHOLD))
                summary[scenario][method]["forget_quality_passed"] = passed
        if "original" in methods and all("avg_gap" in run for run in methods["original"]):
            baseline = {run["seed"]: run["avg_gap"] for run in methods["original"]}
            for method, method_runs in methods.items():
                pairs = [(run["avg_gap"], baseline[run["seed"]]) for run in method_runs if run["seed"] in baseline]
                summary[scenario][method]["gap_closed"] = gap_closed_interval(*zip(*pairs)) if pairs else None
    return summary


def gap_closed_interval(
    gaps: Sequence[float], original_gaps: Sequence[float], confidence: float = 0.95, resamples: int = 9999
) -> dict[str, float]:
    """`1 - mean(avg_gap) / mean(avg_gap of the original)` over seeds, with a percentile bootstrap interval that
    resamples seeds (pairs of a method's and the original's gap on the same seed).

    Returns:
        `{"value", "low", "high"}`; the bounds are NaN with fewer than 3 seeds or no spread to resample.
    """
    gaps, original_gaps = np.asarray(gaps, dtype=float), np.asarray(original_gaps, dtype=float)

    def closed(method: np.ndarray, original: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 - method.mean(axis=axis) / original.mean(axis=axis)

    value = float(closed(gaps, original_gaps))
    low = high = math.nan
    if len(gaps) >= 3 and (np.ptp(gaps) > 0 or np.ptp(original_gaps) > 0) and original_gaps.mean() > 0:
        interval = scipy.stats.bootstrap(
            (gaps, original_gaps),
            closed,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(0),
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"value": value, "low": low, "high": high}


def _cell(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    if abs(mean) >= 1e4:  # a diverged model's perplexity, say
        return _scientific(mean, std)
    if std is None or not math.isfinite(std) or std == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval_cell(interval: Mapping[str, float] | None) -> str:
    if not interval:
        return "-"
    text = _cell(interval["value"], None, 2)
    low, high = interval["low"], interval["high"]  # None in a report read back (JSON has no NaN): under 3 seeds
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.2f}, {high:.2f}]"
    return text


def _scientific(mean: float, std: float | None) -> str:
    return f"{mean:.1e}" + (f" ± {std:.1e}" if std is not None and math.isfinite(std) and std > 0 else "")


def _pvalue_cell(mean: float, std: float | None = None) -> str:
    """A p-value and its spread: three decimals, or two significant digits below 0.001."""
    if mean is not None and math.isfinite(mean) and mean < 1e-3:
        return _scientific(mean, std)
    return _cell(mean, std)


def is_language_model_scenario(methods: Mapping[str, Mapping[str, Any]]) -> bool:
    return any("forget_quality" in entry["mean"] for entry in methods.values())


def _scenario_heading(results: Mapping[str, Any], scenario: str) -> list[str]:
    """The heading of a scenario's table: its forget set, or each seed's where they differ (entity and random forget
    sets are drawn per seed). Runs of older versions carry no `forget_set`; where none does, the scenario's one
    description stands (that of the last seed run)."""
    runs = results.get("runs", ())
    forget_sets = {run["seed"]: run.get("forget_set") for run in runs if run["scenario"] == scenario}
    known = set(forget_sets.values()) - {None}
    if not known:
        return [f"### {scenario}: {results['scenarios'][scenario]}"]
    if len(set(forget_sets.values())) == 1:  # every seed recorded the same
        return [f"### {scenario}: {known.pop()}"]
    per_seed = "; ".join(
        f"seed {seed}: {forget_set or 'not recorded'}" for seed, forget_set in sorted(forget_sets.items())
    )
    return [f"### {scenario}", "", f"Forget sets: {per_seed}."]


def format_benchmark_tables(results: Mapping[str, Any]) -> str:
    """Markdown: one table per scenario, one row per method (mean ± std over seeds)."""
    lines = []
    if results.get("complete") is False:
        finished = ", ".join(sorted({f"{run['scenario']} seed {run['seed']}" for run in results["runs"]}))
        lines += [f"Partial report: the run has finished {finished} so far (or stopped there).", ""]
    environment_record = results["environment"]
    kinds = set()
    for scenario, methods in results["summary"].items():
        seeds = max(entry["seeds"] for entry in methods.values())
        lines += [*_scenario_heading(results, scenario), ""]
        lines.append(
            f"{seeds} seed(s); mean ± std over seeds; {environment_record['device_name']} "
            f"({environment_record['device']}, {environment_record['num_processes']} process(es))."
        )
        lines.append("")
        language_model = is_language_model_scenario(methods)
        kinds.add(language_model)
        rows = _language_model_rows(methods) if language_model else _classifier_rows(methods)
        lines += ["| " + " | ".join(row) + " |" for row in rows[:1]]
        lines.append("|---" * len(rows[0]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        lines.append("")
        stage_lines = [_stage_line(method, entry) for method, entry in methods.items() if entry.get("stage_seconds")]
        stage_lines += [
            _repair_line(method, entry["repairs"]) for method, entry in methods.items() if "repairs" in entry
        ]
        lines += [*stage_lines, ""] if stage_lines else []
    if False in kinds:
        lines.append(
            "avg_gap: mean absolute difference to `retrain` of forget/retain/test accuracy and mia_efficacy, in "
            "percentage points; gap_closed = 1 - mean avg_gap / mean avg_gap(original) over seeds, with a percentile "
            "bootstrap interval over seeds (none under 3 seeds); times include each method's Fisher passes."
        )
    if True in kinds:
        lines.append(
            "forget_quality: TOFU's KS-test p-value of the forget questions' truth ratios against `retrain` of the "
            f"same seed (p ≥ {FORGET_QUALITY_THRESHOLD}: seeds reaching TOFU's threshold); model_utility: TOFU's "
            "harmonic mean of answer probability, ROUGE-L recall and truth ratio on retain questions and real-world "
            "facts, and its share of the original's (per seed); forget_rouge_l: ROUGE-L recall of greedy answers to "
            "the forget questions; privleak: MUSE's relative Min-K% AUC difference to `retrain`; attack AUCs: forget "
            "rows against held-out people's rows; times include each method's Fisher passes."
        )
    return "\n".join(lines).rstrip() + "\n"


def _stage_line(method: str, entry: Mapping[str, Any]) -> str:
    """Where a DeepClean run's time went: seconds per stage (mean over seeds) and each stage's share of the time."""
    total = entry["mean"]["seconds"]
    stages = ", ".join(
        f"{stage} {seconds:.1f} s ({seconds / total:.0%})" if total else f"{stage} {seconds:.1f} s"
        for stage, seconds in entry["stage_seconds"].items()
    )
    return f"`{method}` by stage (mean over seeds): {stages}."


def _repair_line(method: str, repairs: list[Mapping[str, Any]]) -> str:
    """A DeepClean method's repair per seed: the rate, the steps, whether early stopping ended it, the probe's
    steps per trial (`-`: the rate was given)."""

    def join(values) -> str:
        return " / ".join(str(value) for value in values)

    rates = join(f"{r['learning_rate']:g}" if r.get("learning_rate") is not None else "-" for r in repairs)
    probes = join(r.get("learning_rate_probe_steps", "-") for r in repairs)
    stopped = sum(bool(r.get("stopped_early")) for r in repairs)
    return (
        f"`{method}` repair (seeds {join(r['seed'] for r in repairs)}): rate {rates}, steps "
        f"{join(r['steps'] for r in repairs)}, stopped early {stopped}/{len(repairs)}, probe steps per trial {probes}."
    )


def _classifier_rows(methods: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = [["method", *SUMMARY_METRICS, "avg_gap", "gap_closed [95% CI]", "time (s)", "time / retrain"]]
    for method, entry in methods.items():
        mean, std = entry["mean"], entry["std"]
        cells = [_cell(mean.get(key, math.nan), std.get(key)) for key in SUMMARY_METRICS]
        cells += [
            _cell(mean["avg_gap"], std["avg_gap"], 1),
            _interval_cell(entry.get("gap_closed")),
            _cell(mean["seconds"], None, 1),
            _cell(mean["time_share_of_retrain"], None, 2),
        ]
        rows.append([method, *cells])
    return rows


def _language_model_rows(methods: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    header = ["method", "forget_quality", f"p ≥ {FORGET_QUALITY_THRESHOLD}", "model_utility", "utility / original"]
    rows = [[*header, *LANGUAGE_MODEL_COLUMNS, "time (s)", "time / retrain"]]
    for method, entry in methods.items():
        mean, std = entry["mean"], entry["std"]
        cells = [
            _pvalue_cell(mean["forget_quality"], std["forget_quality"]),
            f"{entry['forget_quality_passed']}/{entry['seeds']}",
            _cell(mean["model_utility"], std["model_utility"]),
            _cell(mean["utility_share_of_original"], std["utility_share_of_original"]),
            *(_cell(mean.get(key, math.nan), std.get(key)) for key in LANGUAGE_MODEL_COLUMNS),
            _cell(mean["seconds"], None, 1),
            _cell(mean["time_share_of_retrain"], None, 2),
        ]
        rows.append([method, *cells])
    return rows


def _bar_panel(axis, methods: Mapping[str, Mapping[str, Any]], keys: Sequence[str], title: str) -> None:
    """Bars of `keys` per method with their spread over seeds; the retrained model's values dashed."""
    names = list(methods)
    x = np.arange(len(names))
    reference = methods.get("retrain", {}).get("mean", {})
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        means = [methods[name]["mean"].get(key, math.nan) for name in names]
        stds = [methods[name]["std"].get(key, 0.0) for name in names]
        bars = axis.bar(x + (k - (len(keys) - 1) / 2) * width, means, width, yerr=stds, label=key, capsize=2)
        if key in reference:
            axis.axhline(reference[key], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    axis.set_xticks(x, names, rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_title(title)
    axis.legend(fontsize=8, loc="lower left")


def _figure(methods: Mapping[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(methods)), 4.2), constrained_layout=True)
    return plt, fig, axes


def plot_scenario(scenario: str, methods: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Accuracy per split and membership-inference figures per method; the retrained model's values are marked."""
    plt, fig, axes = _figure(methods)
    _bar_panel(
        axes[0],
        methods,
        ("forget_accuracy", "retain_accuracy", "test_accuracy"),
        f"{scenario}: accuracy (dashed: retrain)",
    )
    _bar_panel(axes[1], methods, ("mia_auc", "mia_efficacy"), f"{scenario}: membership inference (dashed: retrain)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_language_model_scenario(
    scenario: str, methods: Mapping[str, Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], path: Path
) -> None:
    """Forget quality (log scale) against model utility, TOFU's plot: each seed a small point, the mean over seeds a
    large one, the retrained model a star and the original a cross, TOFU's threshold dashed; and the membership
    attacks' AUCs per method (the retrained model's dashed)."""
    plt, fig, axes = _figure(methods)
    axis = axes[0]
    markers = {"retrain": "*", "original": "X"}
    for index, (method, entry) in enumerate(methods.items()):
        color = f"C{index % 10}"
        seeds = [run["metrics"] for run in runs if run["method"] == method]
        axis.scatter(
            [m["model_utility"] for m in seeds],
            [max(m["forget_quality"], 1e-300) for m in seeds],
            color=color,
            alpha=0.35,
            s=14,
        )
        mean = entry["mean"]
        axis.scatter(
            mean["model_utility"],
            max(mean["forget_quality"], 1e-300),
            color=color,
            marker=markers.get(method, "o"),
            s=150 if method in markers else 60,
            edgecolors="black",
            linewidths=0.6,
            label=method,
            zorder=3,
        )
    axis.axhline(FORGET_QUALITY_THRESHOLD, color="grey", linestyle="--", linewidth=1)
    axis.annotate(
        f"p = {FORGET_QUALITY_THRESHOLD}", (0.01, FORGET_QUALITY_THRESHOLD), xycoords=("axes fraction", "data")
    )
    axis.set_yscale("log")
    axis.set_xlabel("model utility")
    axis.set_ylabel("forget quality (KS p-value against retrain)")
    axis.set_title(f"{scenario}: forget quality against model utility")
    axis.legend(fontsize=7, loc="best")
    _bar_panel(axes[1], methods, ATTACK_AUCS, f"{scenario}: attack AUC, forget vs held-out (dashed: retrain)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_benchmark_report(results: Mapping[str, Any], output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `results.md`, `results.json` and `plots/{scenario}.png` to `output_dir`, atomically; returns it."""
    with atomic_output_dir(output_dir, overwrite) as staging:
        (staging / "plots").mkdir()
        (staging / "results.md").write_text(format_benchmark_tables(results))
        (staging / "results.json").write_text(to_json(results))
        for scenario, methods in results["summary"].items():
            path = staging / "plots" / f"{scenario}.png"
            if is_language_model_scenario(methods):
                runs = [run for run in results["runs"] if run["scenario"] == scenario]
                plot_language_model_scenario(scenario, methods, runs, path)
            else:
                plot_scenario(scenario, methods, path)
    return Path(output_dir)
