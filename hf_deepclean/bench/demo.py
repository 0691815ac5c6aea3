"""The offline demo: train a small ViT on scikit-learn's digits, unlearn one digit class, compare with retraining.

Everything runs on the CPU in about a minute and goes through the same code path as `hf-deepclean unlearn`:
the trained model is saved as a local folder laid out exactly like a Hub checkpoint, and the dataset as a
`save_to_disk` folder, and the unlearner loads both by path.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from datasets.utils import disable_progress_bars
from PIL import Image as PILImage
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from ..config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from ..data.collators import ClassificationCollator, Columns, make_dataloader
from ..errors import DeepCleanError
from ..evaluation.metrics import average_gap
from ..pipeline.unlearn import DeepCleanUnlearner
from ..unlearning.training import train_model


DIGIT_NAMES = [str(d) for d in range(10)]
# A whole class is the scenario where forgetting is unmistakable: the retrained model never predicts it, while
# the original recognises it perfectly. A random subset of a memorised training set hardly differs from test data
# after retraining (its accuracy stays near test accuracy), so the table would show only a few points of gap.
DEFAULT_FORGET = "class:3"


def build_digits_dataset(seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """scikit-learn's 1,797 8x8 digits as a `DatasetDict` of RGB images with a `ClassLabel`, split train/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    images = [PILImage.fromarray(image, mode="L").convert("RGB") for image in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def build_digits_model(seed: int = 0) -> tuple[ViTForImageClassification, ViTImageProcessor]:
    """A 70k-parameter ViT (2 layers, hidden 64, 2x2 patches) and its image processor, from config."""
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label=dict(enumerate(DIGIT_NAMES)),
        label2id={name: i for i, name in enumerate(DIGIT_NAMES)},
        architectures=["ViTForImageClassification"],
    )
    set_seed(seed)
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def train_digits_model(
    dataset: Dataset, processor, accelerator: Accelerator, *, epochs: int, seed: int, desc: str
) -> ViTForImageClassification:
    """Train the demo ViT from its seeded initialisation on `dataset` until it fits it."""
    model, _ = build_digits_model(seed)
    model.to(accelerator.device)
    collator = ClassificationCollator(processor, Columns(label="label", image="image"), label_map=None)
    loader = make_dataloader(dataset, collator, batch_size=32, shuffle=True, seed=seed)
    train_model(
        model,
        loader,
        accelerator,
        epochs=epochs,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_ratio=0.05,
        lr_scheduler_type="cosine",
        desc=desc,
    )
    return model


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

    unlearner = DeepCleanUnlearner(
        method or DeepCleanConfig(),
        ModelArguments(str(work / "original")),
        DataArguments(str(work / "digits"), forget=forget),
        OutputArguments(str(output_dir), overwrite_output_dir=overwrite_output_dir, seed=seed),
        accelerator=accelerator,
    )
    results = unlearner.run()

    retain_rows = unlearner.data.retain
    start = time.perf_counter()
    reference = train_digits_model(retain_rows, processor, accelerator, epochs=epochs, seed=seed, desc="Retrain")
    retrain_seconds = time.perf_counter() - start
    metrics = {
        "original": results["metrics"]["before"],
        "deepclean": results["metrics"]["after"],
        "retrained": unlearner.evaluate(reference, prefix="reference "),
    }
    for name in ("original", "deepclean"):
        metrics[name]["avg_gap"] = average_gap(metrics[name], metrics["retrained"])
    return DemoResult(metrics, results["timings"]["unlearning"], retrain_seconds, Path(output_dir))


def format_demo_table(result: DemoResult) -> str:
    """The demo's one table: accuracy and attack figures per model, and the time of each route."""
    columns = ("forget_accuracy", "retain_accuracy", "test_accuracy", "mia_auc", "mia_efficacy", "avg_gap")
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


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        default="image-classification",
        choices=("image-classification", "causal-lm"),
        help="`image-classification`: forget a digit class from a ViT; `causal-lm`: forget notes with secret PINs "
        "from a GPT-2's LoRA adapter (--forget and --epochs do not apply). Default: %(default)s.",
    )
    parser.add_argument("--output_dir", default="demo_output", help="Folder for the cleaned model.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace an existing --output_dir.")
    # no defaults here, so that a value given with `--task causal-lm` (where they do not apply) can be refused
    parser.add_argument("--forget", default=None, help=f"Forget specification (default: {DEFAULT_FORGET}).")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs of original and reference (40).")
    parser.add_argument("--work_dir", default=".deepclean_demo", help="Scratch folder for the trained model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data split, initialisation and training.")


def run_demo_from_args(args: argparse.Namespace) -> int:
    common = {"work_dir": args.work_dir, "overwrite_output_dir": args.overwrite_output_dir, "seed": args.seed}
    if args.task == "causal-lm":
        from .causal_lm_demo import format_causal_lm_table, run_causal_lm_demo

        for flag in ("forget", "epochs"):
            if getattr(args, flag) is not None:
                raise DeepCleanError(
                    f"--{flag}: does not apply to --task causal-lm; expected it only with image-classification."
                )

        result = run_causal_lm_demo(args.output_dir, **common)
        table = format_causal_lm_table(result)
    else:
        forget = DEFAULT_FORGET if args.forget is None else args.forget
        result = run_demo(args.output_dir, forget=forget, epochs=40 if args.epochs is None else args.epochs, **common)
        table = format_demo_table(result)
    print(table)
    print(f"Cleaned model written to {result.output_dir}")
    return 0
