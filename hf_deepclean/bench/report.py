"""The benchmark's report: aggregates over seeds, Markdown tables, one plot per scenario."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from ..hub.output import atomic_output_dir
from ..records import SUMMARY_METRICS, to_json


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and standard deviation over seeds of every metric, avg_gap, gap_closed and time, per scenario and method."""
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
                for key in ("avg_gap", "gap_closed", "seconds", "time_share_of_retrain"):
                    values.setdefault(key, []).append(run[key])
            summary[scenario][method] = {
                "seeds": len(method_runs),
                "mean": {key: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for key, v in values.items()},
                "std": {key: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan for key, v in values.items()},
            }
        if "original" in methods:
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
    if std is None or not math.isfinite(std) or std == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval_cell(interval: Mapping[str, float] | None) -> str:
    if not interval:
        return "-"
    text = _cell(interval["value"], None, 2)
    if math.isfinite(interval["low"]) and math.isfinite(interval["high"]):
        text += f" [{interval['low']:.2f}, {interval['high']:.2f}]"
    return text


def format_benchmark_tables(results: Mapping[str, Any]) -> str:
    """Markdown: one table per scenario, one row per method (mean ± std over seeds)."""
    lines = []
    environment_record = results["environment"]
    for scenario, methods in results["summary"].items():
        seeds = max(entry["seeds"] for entry in methods.values())
        lines.append(f"### {scenario}: {results['scenarios'][scenario]}")
        lines.append("")
        lines.append(
            f"{seeds} seed(s); mean ± std over seeds; {environment_record['device_name']} "
            f"({environment_record['device']}, {environment_record['num_processes']} process(es))."
        )
        lines.append("")
        header = ["method", *SUMMARY_METRICS, "avg_gap", "gap_closed [95% CI]", "time (s)", "time / retrain"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---" * len(header) + "|")
        for method, entry in methods.items():
            mean, std = entry["mean"], entry["std"]
            cells = [_cell(mean.get(key, math.nan), std.get(key)) for key in SUMMARY_METRICS]
            cells += [
                _cell(mean["avg_gap"], std["avg_gap"], 1),
                _interval_cell(entry.get("gap_closed")),
                _cell(mean["seconds"], None, 1),
                _cell(mean["time_share_of_retrain"], None, 2),
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "avg_gap: mean absolute difference to `retrain` of forget/retain/test accuracy and mia_efficacy, in "
        "percentage points; gap_closed = 1 - mean avg_gap / mean avg_gap(original) over seeds, with a percentile "
        "bootstrap interval over seeds (none under 3 seeds); times include each method's Fisher passes."
    )
    return "\n".join(lines).rstrip() + "\n"


def plot_scenario(scenario: str, methods: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Accuracy per split and membership-inference figures per method; the retrained model's values are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    x = np.arange(len(names))
    reference = methods.get("retrain", {}).get("mean", {})
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(names)), 4.2), constrained_layout=True)
    panels = (
        (axes[0], ("forget_accuracy", "retain_accuracy", "test_accuracy"), "accuracy"),
        (axes[1], ("mia_auc", "mia_efficacy"), "membership inference"),
    )
    for axis, keys, title in panels:
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            means = [methods[name]["mean"].get(key, math.nan) for name in names]
            stds = [methods[name]["std"].get(key, 0.0) for name in names]
            bars = axis.bar(x + (k - (len(keys) - 1) / 2) * width, means, width, yerr=stds, label=key, capsize=2)
            if key in reference:
                axis.axhline(reference[key], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{scenario}: {title} (dashed: retrain)")
        axis.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_benchmark_report(results: Mapping[str, Any], output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `results.md`, `results.json` and `plots/{scenario}.png` to `output_dir`, atomically; returns it."""
    with atomic_output_dir(output_dir, overwrite) as staging:
        (staging / "plots").mkdir()
        (staging / "results.md").write_text(format_benchmark_tables(results))
        (staging / "results.json").write_text(to_json(results))
        for scenario, methods in results["summary"].items():
            plot_scenario(scenario, methods, staging / "plots" / f"{scenario}.png")
    return Path(output_dir)
