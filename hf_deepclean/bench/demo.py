"""The offline demo: train a small ViT on scikit-learn's digits, unlearn one digit class, compare with retraining.

Everything runs on the CPU in about a minute and goes through the same code path as `hf-deepclean unlearn`:
the trained model is saved as a local folder laid out exactly like a Hub checkpoint, and the dataset as a
`save_to_disk` folder, and the unlearner loads both by path.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets.utils import disable_progress_bars

from ..config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from ..evaluation.metrics import average_gap
from ..pipeline.unlearn import unlearn
from ..records import SUMMARY_METRICS
from .digits import build_digits_dataset, build_digits_model, train_digits_model


# A whole class is the scenario where forgetting is unmistakable: the retrained model never predicts it, while
# the original recognises it perfectly. A random subset of a memorised training set hardly differs from test data
# after retraining (its accuracy stays near test accuracy), so the table would show only a few points of gap.
DEFAULT_FORGET = "class:3"


@dataclass
class DemoResult:
    metrics: dict[str, dict[str, float]]
    unlearning_seconds: float
    retrain_seconds: float | None  # None where the demo retrains no reference (causal-LM demo)
    output_dir: Path
    fisher_scopes: dict[str, dict[str, float]] = field(default_factory=dict)  # causal-LM demo: scope comparison


def run_demo(
    output_dir: str | Path = "demo_output",
    *,
    forget: str = DEFAULT_FORGET,
    epochs: int = 40,
    work_dir: str | Path = ".deepclean_demo",
    overwrite_output_dir: bool = False,
    seed: int = 0,
    method: DeepCleanConfig | None = None,
) -> DemoResult:
    """Train, save, unlearn through the `unlearn` code path, retrain a reference, and compare.

    Args:
        output_dir: where the cleaned checkpoint goes.
        forget: forget specification against the digits training split.
        epochs: training epochs of the original and of the reference model.
        work_dir: scratch folder; its `digits/` and `original/` subfolders are replaced on each run.
        method: DeepClean hyperparameters (the library defaults when omitted).
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    disable_progress_bars()  # the demo's own set-up writes are not worth a bar each
    work = Path(work_dir)
    for own in ("digits", "original"):  # only what an earlier demo run wrote there, never the folder itself
        shutil.rmtree(work / own, ignore_errors=True)
    splits = build_digits_dataset(seed)
    splits.save_to_disk(str(work / "digits"))
    _, processor = build_digits_model(seed)

    original = train_digits_model(splits["train"], processor, accelerator, epochs=epochs, seed=seed, desc="Train")
    original.save_pretrained(work / "original")
    processor.save_pretrained(work / "original")

    run = unlearn(
        method or DeepCleanConfig(),
        ModelArguments(str(work / "original")),
        DataArguments(str(work / "digits"), forget=forget),
        OutputArguments(str(output_dir), overwrite_output_dir=overwrite_output_dir, seed=seed),
        accelerator=accelerator,
    )

    start = time.perf_counter()
    reference = train_digits_model(
        run.session.data.retain, processor, accelerator, epochs=epochs, seed=seed, desc="Retrain"
    )
    retrain_seconds = time.perf_counter() - start
    metrics = {
        "original": dict(run.results.metrics_before),
        "deepclean": dict(run.results.metrics_after),
        "retrained": run.session.evaluate(reference, prefix="reference "),
    }
    for name in ("original", "deepclean"):
        metrics[name]["avg_gap"] = average_gap(metrics[name], metrics["retrained"])
    return DemoResult(metrics, run.results.timings["unlearning"], retrain_seconds, Path(output_dir))


def format_demo_table(result: DemoResult) -> str:
    """The demo's one table: accuracy and attack figures per model, and the time of each route."""
    columns = (*SUMMARY_METRICS, "avg_gap")
    lines = ["| model | " + " | ".join(columns) + " | time (s) |", "|---" * (len(columns) + 2) + "|"]
    times: dict[str, Any] = {
        "original": "-",
        "deepclean": f"{result.unlearning_seconds:.1f}",
        "retrained": f"{result.retrain_seconds:.1f}",
    }
    for name, values in result.metrics.items():
        cells = [f"{values[c]:.3f}" if c in values else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {times[name]} |")
    ratio = result.unlearning_seconds / result.retrain_seconds if result.retrain_seconds else float("nan")
    lines.append("")
    lines.append(
        f"Unlearning took {ratio:.0%} of the retraining time ({result.unlearning_seconds:.1f} s vs "
        f"{result.retrain_seconds:.1f} s); avg_gap is in percentage points to the retrained model."
    )
    return "\n".join(lines)
