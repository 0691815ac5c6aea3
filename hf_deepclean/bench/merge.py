"""`hf-deepclean benchmark --merge_results`: one report from the reports of seeds run apart (separate processes or
machines), re-aggregated as if they had run together."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from ..errors import DeepCleanError
from .report import RUN_FIGURES, summarize


logger = get_logger(__name__)

# what must match for reports to merge: the machine (times are compared, and metrics repeat on one kind of machine
# at one thread count) and the settings that define the scenarios' models and rows. Method settings that differ are
# logged, not refused: a default's recorded form changes between versions (`early_stopping` None, decided per model,
# was True) while its effect does not, and a method run in two reports must have the same metrics in both anyway.
MACHINE_KEYS = ("device_name", "num_processes", "cpu_count", "torch_threads", "torch", "transformers")
SCENARIO_KEYS = ("epochs", "max_eval_samples", "max_train_rows", "reviews_model_name_or_path", "reviews_data_file")
# method settings compare on the keys both reports have (a newer version may add some)
METHOD_SETTINGS = ("deepclean", "baselines")


def merge_results(
    paths: Sequence[str | Path], seeds: Sequence[int] | None = None, scenarios: Sequence[str] | None = None
) -> dict[str, Any]:
    """One benchmark result from the runs of several reports (`results.json` files or folders holding one); with
    `seeds` or `scenarios`, the runs of those seeds or scenarios only (a report of two scenarios that shared their
    original model splits into one report each). Runs are ordered by scenario (as first seen), seed and method (as first
    seen), so the order of `paths` does not change the report.

    The reports must come from one kind of machine and ran with the same scenario settings; method settings that
    differ are logged. A scenario, seed and method found in more than one report must have the same metrics there, to
    `SAME_METRICS_TOLERANCE` (the same trained model, as a rerun on the same kind of CPU machine gives; on GPUs keep
    each run in one report), and is kept once: its first copy, with the fields only a later copy has (an older
    version recorded less, such as DeepClean's repair). Each report's path, arguments and environment are kept under
    `merged_from` (a merged report's own sources in its place).

    Raises:
        DeepCleanError: in one line, naming the reports or the seeds that do not fit.
    """
    runs: dict[tuple[str, int, str], dict[str, Any]] = {}
    origin: dict[tuple[str, int, str], str] = {}
    descriptions: dict[str, str] = {}
    sources: list[dict[str, Any]] = []
    for path in paths:
        file, results = read_results(path)
        if sources:
            check_compatible(sources[0], str(file), results)
        # a merged report stands for its own sources
        sources += results.get("merged_from") or [
            {"path": str(file), "arguments": results.get("arguments"), "environment": results["environment"]}
        ]
        descriptions.update(results.get("scenarios") or {})
        for run in with_forget_sets(map(restore_missing, results["runs"]), results.get("scenarios") or {}):
            key = (run["scenario"], run["seed"], run["method"])
            if key in runs and not same_numbers(runs[key]["metrics"], run["metrics"]):
                raise DeepCleanError(
                    f"--merge_results: {key[2]} on {key[0]} seed {key[1]} is in {origin[key]} and in {file} with "
                    "different metrics; expected each scenario, seed and method once, or with the same metrics (the "
                    "same trained model)."
                )
            runs[key] = {**run, **runs.get(key, {})}  # the first copy, with what only a later one records
            origin.setdefault(key, str(file))
    if not runs:
        raise DeepCleanError("--merge_results: the reports hold no runs; expected reports with finished seeds.")
    check_held("seeds", seeds, {seed for _, seed, _ in runs})
    check_held("scenarios", scenarios, {scenario for scenario, _, _ in runs})
    scenario_order = {name: i for i, name in enumerate(dict.fromkeys(key[0] for key in runs))}
    method_order = {name: i for i, name in enumerate(dict.fromkeys(key[2] for key in runs))}
    keys = sorted(
        (key for key in runs if (seeds is None or key[1] in seeds) and (scenarios is None or key[0] in scenarios)),
        key=lambda key: (scenario_order[key[0]], key[1], method_order[key[2]]),
    )
    merged = [runs[key] for key in keys]
    if not merged:  # each held, but not together
        raise DeepCleanError(
            f"--seeds, --scenarios: got {' '.join(map(str, seeds or ()))} and {' '.join(scenarios or ())}; the "
            "reports of --merge_results hold no run of those seeds in those scenarios."
        )
    return {
        "runs": merged,
        "summary": summarize(merged),
        "scenarios": {
            name: text for name, text in descriptions.items() if any(run["scenario"] == name for run in merged)
        },
        "environment": sources[0]["environment"],
        "merged_from": sources,
    }


def check_held(flag: str, wanted: Sequence | None, held: set) -> None:
    """Refuse the seeds or scenarios (`flag`) asked for (`wanted`) that the reports hold no run of."""
    missing = [value for value in wanted or () if value not in held]
    if missing:
        raise DeepCleanError(
            f"--{flag}: got {' '.join(map(str, wanted))}; the reports of --merge_results hold no run of "
            f"{flag[:-1]}(s) {' '.join(map(str, missing))} (they hold {' '.join(map(str, sorted(held)))})."
        )


def read_results(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """`(file, results)` of a report's `results.json` (or its folder), checked to hold runs and an environment."""
    file = Path(path)
    file = file / "results.json" if file.is_dir() else file
    expected = f"--merge_results: got {str(path)!r}; expected the results.json of a benchmark report or its folder."
    try:
        results = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DeepCleanError(expected) from None
    run_keys = {"scenario", "seed", "method", "metrics"}
    if not (
        isinstance(results, dict)
        and isinstance(results.get("environment"), dict)
        and isinstance(results.get("runs"), list)
        and all(isinstance(run, dict) and run_keys <= run.keys() for run in results["runs"])
        and all(isinstance(run["metrics"], dict) for run in results["runs"])
    ):
        raise DeepCleanError(expected)
    return file, results


def arguments(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arguments a report ran with; a merged report's are those of its first source (its sources were checked
    to share the scenario settings), so a merged report merges again with later seeds."""
    if "arguments" in results or not results.get("merged_from"):
        return results.get("arguments")
    return results["merged_from"][0].get("arguments")


def check_compatible(first: Mapping[str, Any], file: str, results: Mapping[str, Any]) -> None:
    """Refuse a report from another kind of machine, or with other scenario settings, than `first`; log the method
    settings that differ."""
    differences = [
        (f"environment.{key}", first["environment"].get(key), results["environment"].get(key))
        for key in MACHINE_KEYS
        if first["environment"].get(key) != results["environment"].get(key)
    ]
    mine, theirs = first.get("arguments") or {}, arguments(results) or {}
    benchmark, other = mine.get("benchmark") or {}, theirs.get("benchmark") or {}
    differences += [
        (f"benchmark.{key}", benchmark.get(key), other.get(key))
        for key in SCENARIO_KEYS
        if benchmark.get(key) != other.get(key)
    ]
    if differences:
        name, a, b = sorted(differences)[0]
        raise DeepCleanError(
            f"--merge_results: {first['path']} and {file} differ in {name} ({a!r} and {b!r}); expected reports of "
            "one kind of machine and the same scenario settings."
        )
    settings = []
    for section in METHOD_SETTINGS:
        a, b = mine.get(section) or {}, theirs.get(section) or {}
        settings += [
            f"{section}.{key} ({a[key]!r} and {b[key]!r})" for key in sorted(a.keys() & b.keys()) if a[key] != b[key]
        ]
    if settings:
        logger.warning(
            f"--merge_results: {first['path']} and {file} ran with other method settings: {', '.join(settings)}; "
            "merged, since runs found in both must have the same metrics: check that the methods are the same in "
            "effect.",
            main_process_only=True,
        )


def restore_missing(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run read back from JSON, where non-finite numbers were written as `null`: `null` is NaN again."""
    run = dict(run)
    run["metrics"] = {key: math.nan if value is None else value for key, value in run["metrics"].items()}
    for key in RUN_FIGURES:
        if key in run and run[key] is None:
            run[key] = math.nan
    return run


def with_forget_sets(runs: Iterable[dict[str, Any]], descriptions: Mapping[str, str]) -> list[dict[str, Any]]:
    """Runs of a report, those of an older version given the `forget_set` it did not record where the report tells
    it: its `scenarios` entry describes the last seed run of each scenario."""
    runs = list(runs)
    last_seeds = {run["scenario"]: run["seed"] for run in runs}
    for run in runs:
        if "forget_set" not in run and last_seeds[run["scenario"]] == run["seed"] and run["scenario"] in descriptions:
            run["forget_set"] = descriptions[run["scenario"]]
    return runs


# metrics of the same trained model agree to this (relative): float32 sums of losses can differ in their last bits
# between versions of the evaluation code (seen: 5e-7), while accuracies and attack AUCs repeat exactly
SAME_METRICS_TOLERANCE = 1e-5


def same_numbers(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """The same metrics, to `SAME_METRICS_TOLERANCE`; NaN matches NaN (the one value unequal to itself)."""
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=SAME_METRICS_TOLERANCE) or (a[k] != a[k] and b[k] != b[k]) for k in a
    )
