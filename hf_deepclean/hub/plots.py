"""Figures of the model card: compact histogram summaries kept in the results record, and their PNG plots.

The run keeps no full tensors or per-sample values in its reports, only fixed-size histograms:
- `ratio_histogram`: the distribution of log10 Fisher ratios over every element in scope, with the selection
  threshold (the smallest ratio among the reset elements);
- `loss_histograms`: per-sample losses of the forget and held-out rows, before and after unlearning, on shared
  log-spaced bins.
The plots are drawn from those records (and the per-module reset shares), so a card can be re-rendered from an
output folder without the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..records import UnlearningResults


if TYPE_CHECKING:
    import torch


RATIO_BINS = 60
LOSS_BINS = 40
# losses below this are drawn in the first bin: a memorised row can reach a loss of exactly 0 in float32
MIN_LOSS = 1e-6
MAX_MODULES_PLOTTED = 40
PLOT_FILES = {
    "fisher_ratios": "deepclean_fisher_ratios.png",
    "reset_per_module": "deepclean_reset_per_module.png",
    "losses": "deepclean_losses.png",
}


def fisher_ratio_histogram(
    ratios: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], bins: int = RATIO_BINS
) -> dict[str, Any]:
    """Histogram of `log10(ratio)` over every element, computed one tensor at a time (no concatenated copy).

    Args:
        ratios: Fisher ratios per parameter.
        masks: the selected elements per parameter.
        bins: number of equal-width bins between the smallest and largest positive log ratio.

    Returns:
        `{"bin_edges", "counts", "zeros", "total", "selected", "threshold"}`: `zeros` counts elements with a
        ratio of 0 (no Fisher information on the forget set), which have no logarithm; `threshold` is the
        smallest ratio among the selected elements (`None` when nothing was selected).
    """
    import torch  # here, not at the top: rendering a card (`hf-deepclean push`) does not need torch

    low, high, zeros, total = math.inf, -math.inf, 0, 0
    for ratio in ratios.values():
        positive = ratio[ratio > 0]
        total += ratio.numel()
        zeros += ratio.numel() - positive.numel()
        if positive.numel():
            logs = positive.double().log10()
            low, high = min(low, float(logs.min())), max(high, float(logs.max()))
    if not math.isfinite(low):
        low, high = 0.0, 0.0
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    counts = torch.zeros(bins, dtype=torch.float64)
    threshold, selected = math.inf, 0
    for name, ratio in ratios.items():
        positive = ratio[ratio > 0].double().log10().cpu()
        counts += torch.histogram(positive, bins=edges).hist
        chosen = ratio[masks[name].to(ratio.device)]
        selected += chosen.numel()
        if chosen.numel():
            threshold = min(threshold, float(chosen.min()))
    return {
        "bin_edges": [round(float(edge), 6) for edge in edges],
        "counts": [int(count) for count in counts],
        "zeros": zeros,
        "total": total,
        "selected": selected,
        "threshold": threshold if selected else None,
    }


def loss_histograms(
    outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    splits: tuple[str, ...] = ("forget", "test"),
    bins: int = LOSS_BINS,
) -> dict[str, Any]:
    """Histograms of per-sample losses on shared log-spaced bins.

    Args:
        outputs: `{stage: {split: {"loss": array, ...}}}` as returned by `evaluate_unlearning(...,
            return_outputs=True)`, for stages such as `before` and `after`.
        splits: the splits to keep (those missing from `outputs` are skipped).
        bins: number of bins.

    Returns:
        `{"bin_edges": [...], "counts": {stage: {split: [...]}}}`; losses below `MIN_LOSS` (a memorised row can
        reach exactly 0) count in the first bin; rows without a finite loss are left out.
    """
    losses = {}
    for stage, values in outputs.items():
        for split in splits:
            if split not in values:
                continue
            array = np.asarray(values[split]["loss"], np.float64)
            array = array[np.isfinite(array)]  # a sequence with no predicted token has no loss (NaN)
            if len(array):
                losses.setdefault(stage, {})[split] = np.clip(array, MIN_LOSS, None)
    every = [array for per_split in losses.values() for array in per_split.values()]
    if not every:
        return {"bin_edges": [], "counts": {}}
    low = float(np.log10(min(array.min() for array in every)))
    high = float(np.log10(max(array.max() for array in every)))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    edges = np.logspace(low, high, bins + 1)
    return {
        "bin_edges": [float(f"{edge:.6g}") for edge in edges],
        "counts": {
            # clipped to the outer edges: logspace may round them inwards by an ulp, and no row may be dropped
            stage: {
                split: np.histogram(np.clip(array, edges[0], edges[-1]), bins=edges)[0].tolist()
                for split, array in per_split.items()
            }
            for stage, per_split in losses.items()
        },
    }


# --------------------------------------------------------------------------------------------------------------
# PNG plots
# --------------------------------------------------------------------------------------------------------------


def available_plots(results: UnlearningResults) -> dict[str, str]:
    """The plots a results record has data for: `{plot name: file name}`."""
    available = {}
    if results.ratio_histogram.get("counts"):
        available["fisher_ratios"] = PLOT_FILES["fisher_ratios"]
    if results.reset.statistics.per_parameter:
        available["reset_per_module"] = PLOT_FILES["reset_per_module"]
    if results.loss_histograms.get("counts"):
        available["losses"] = PLOT_FILES["losses"]
    return available


def _new_figure(width: float, height: float):
    # the object-oriented API draws without pyplot's global state or a GUI backend
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: Path) -> None:
    figure.savefig(path, format="png", metadata={"Software": None})


def plot_fisher_ratios(histogram: Mapping[str, Any], path: Path) -> None:
    """Bar histogram of log10 Fisher ratios with the selection threshold as a vertical line."""
    figure = _new_figure(6.4, 3.6)
    axes = figure.add_subplot()
    edges = np.asarray(histogram["bin_edges"])
    axes.stairs(histogram["counts"], edges, fill=True, color="#4c72b0", alpha=0.8)
    axes.set_yscale("symlog", linthresh=1)
    if histogram.get("threshold"):
        threshold = math.log10(histogram["threshold"])
        share = histogram["selected"] / histogram["total"] if histogram["total"] else 0.0
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold ({share:.2%} reset to the right)")
        axes.legend(loc="upper right", fontsize="small")
    axes.set_xlabel("log10 F_forget / (F_retain + eps)")
    axes.set_ylabel("weights")
    title = "Fisher ratio per weight"
    if histogram.get("zeros"):
        title += f" ({histogram['zeros']} weights with ratio 0 not shown)"
    axes.set_title(title, fontsize="medium")
    _save(figure, path)


def plot_reset_per_module(per_module: Mapping[str, float], path: Path) -> None:
    """Horizontal bars: share of each module's weights that was reset, in model order."""
    items = list(per_module.items())
    title = "Share of weights reset per module"
    if len(items) > MAX_MODULES_PLOTTED:
        keep = {name for name, _ in sorted(items, key=lambda item: -item[1])[:MAX_MODULES_PLOTTED]}
        items = [item for item in items if item[0] in keep]
        title += f" (the {MAX_MODULES_PLOTTED} largest of {len(per_module)})"
    figure = _new_figure(7.0, 1.0 + 0.22 * len(items))
    axes = figure.add_subplot()
    positions = np.arange(len(items))
    axes.barh(positions, [share * 100 for _, share in items], color="#4c72b0")
    axes.set_yticks(positions, [name for name, _ in items], fontsize="x-small")
    axes.invert_yaxis()
    axes.set_xlabel("% of the module's weights reset")
    axes.set_title(title, fontsize="medium")
    _save(figure, path)


def plot_losses(histograms: Mapping[str, Any], path: Path) -> None:
    """Per-sample loss distributions of forget vs held-out rows, one panel per stage (before, after)."""
    stages = list(histograms["counts"])
    figure = _new_figure(4.0 * len(stages), 3.4)
    # log10 on a linear axis: a log axis over less than a decade labels its minor ticks on top of each other
    edges = np.log10(np.asarray(histograms["bin_edges"]))
    colors = {"forget": "#c44e52", "test": "#4c72b0", "retain": "#55a868"}
    for index, stage in enumerate(stages):
        axes = figure.add_subplot(1, len(stages), index + 1)
        for split, counts in histograms["counts"][stage].items():
            counts = np.asarray(counts, dtype=np.float64)
            share = counts / counts.sum() if counts.sum() else counts
            label = "held-out" if split == "test" else split
            axes.stairs(
                share, edges, label=f"{label} ({int(counts.sum())} rows)", color=colors.get(split), linewidth=1.5
            )
        axes.set_xlabel("log10 per-sample loss")
        axes.set_ylabel("share of rows" if index == 0 else "")
        axes.set_title(f"{stage} unlearning", fontsize="medium")
        axes.legend(fontsize="small")
    _save(figure, path)


def save_plots(results: UnlearningResults, folder: str | Path) -> dict[str, str]:
    """Write every plot the results record has data for into `folder`.

    Returns:
        `{plot name: file name}` of the files written (relative to `folder`).
    """
    folder = Path(folder)
    written = available_plots(results)
    if "fisher_ratios" in written:
        plot_fisher_ratios(results.ratio_histogram, folder / written["fisher_ratios"])
    if "reset_per_module" in written:
        plot_reset_per_module(results.reset.statistics.per_module(), folder / written["reset_per_module"])
    if "losses" in written:
        plot_losses(results.loss_histograms, folder / written["losses"])
    return written
