"""Benchmark scenarios, a small end-to-end benchmark run, and the `evaluate` / `benchmark` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import torchrun_process

from hf_deepclean.bench.benchmark import BenchmarkArguments, method_config
from hf_deepclean.bench.report import format_benchmark_tables, summarize
from hf_deepclean.bench.scenarios import build_digits_scenario
from hf_deepclean.cli import main
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.unlearning.selection import select_weights_to_reset
from hf_deepclean.unlearning.training import train_model


def test_digits_scenarios_forget_what_they_say():
    random = build_digits_scenario("digits_random", seed=0)
    assert len(random.forget_indices) == round(0.1 * len(random.train))
    classes = build_digits_scenario("digits_class", seed=0)
    labels = classes.train["label"]
    assert {labels[i] for i in classes.forget_indices} == {3} and labels.count(3) == len(classes.forget_indices)
    clean = build_digits_scenario("digits_random", seed=0).train["label"]
    noisy = build_digits_scenario("digits_mislabelled", seed=0)
    changed = [i for i, (a, b) in enumerate(zip(clean, noisy.train["label"])) if a != b]
    # exactly the forget rows carry a wrong label, and nothing else changed
    assert changed == noisy.forget_indices and len(changed) == round(0.05 * len(clean))
    forget, retain = noisy.split_rows()
    assert len(forget) + len(retain) == len(noisy.train)


def test_method_names_and_presets():
    assert method_config("ssd", DeepCleanConfig()) == ("ssd", DeepCleanConfig())
    function, config = method_config("deepclean_paper", DeepCleanConfig())
    assert function == "deepclean" and config.reset == "zero" and config.gamma == 10.0
    function, config = method_config("deepclean_finetuned", DeepCleanConfig())
    assert function == "deepclean" and config.reset == "base" and config.early_stopping
    assert config.early_stopping_criterion == "retain" and config.reset_fraction == DeepCleanConfig().reset_fraction
    with pytest.raises(DeepCleanError, match="--methods: got 'magic'"):
        method_config("magic", DeepCleanConfig())
    with pytest.raises(DeepCleanError, match="--scenarios: got 'mnist'"):
        BenchmarkArguments(scenarios=["mnist"])
    with pytest.raises(DeepCleanError, match="--preset: got 'fast'"):
        DeepCleanConfig.from_preset("fast")


def test_summary_means_and_gap_closed():
    runs = [
        {
            "scenario": "s",
            "seed": seed,
            "method": "m",
            "seconds": 2.0 * (seed + 1),
            "metrics": {"forget_accuracy": acc},
            "avg_gap": gap,
            "gap_closed": closed,
            "time_share_of_retrain": 0.1,
            "stage_seconds": {"fisher_retain": 1.0 + seed, "repair": 0.5},
            "repair": {"steps": 10 * (seed + 1), "stopped_early": bool(seed), "learning_rate": 1e-3},
        }
        for seed, acc, gap, closed in ((0, 0.2, 10.0, 0.5), (1, 0.4, 30.0, 0.7))
    ]
    entry = summarize(runs)["s"]["m"]
    assert entry["stage_seconds"] == {"fisher_retain": 1.5, "repair": 0.5}
    assert [(r["seed"], r["steps"], r["stopped_early"]) for r in entry["repairs"]] == [(0, 10, False), (1, 20, True)]
    assert entry["seeds"] == 2
    assert entry["mean"]["forget_accuracy"] == pytest.approx(0.3) and entry["std"]["forget_accuracy"] == pytest.approx(
        0.1
    )
    assert entry["mean"]["avg_gap"] == 20.0 and entry["mean"]["gap_closed"] == pytest.approx(0.6)
    assert entry["mean"]["seconds"] == 3.0


def small_benchmark_arguments(output) -> list[str]:
    """A benchmark small enough for the suite: one scenario, one seed, 150 training rows, 3 epochs."""
    return [
        *("--output_dir", str(output), "--scenarios", "digits_class", "--seeds", "0", "--epochs", "3"),
        *("--max_train_rows", "150", "--methods", "finetune", "ssd", "deepclean", "--repair_epochs", "1"),
    ]


def test_benchmark_command_writes_tables_json_and_plots(tmp_path, capsys):
    output = tmp_path / "bench"
    args = ["benchmark", *small_benchmark_arguments(output)]
    assert main(args) == 0
    results = json.loads((output / "results.json").read_text())
    methods = results["summary"]["digits_class"]
    assert list(methods) == ["original", "retrain", "finetune", "ssd", "deepclean"]
    assert methods["retrain"]["mean"]["avg_gap"] == 0.0 and methods["retrain"]["mean"]["gap_closed"] == 1.0
    assert methods["original"]["mean"]["gap_closed"] == 0.0
    for run in results["runs"]:
        assert run["time_share_of_retrain"] == pytest.approx(run["seconds"] / methods["retrain"]["mean"]["seconds"])
        # DeepClean's runs say where their time went; the stages are timed within the run's own time
        stages = run.get("stage_seconds", {})
        assert (run["method"] == "deepclean") == bool(stages)
        if stages:
            assert {"fisher_forget", "fisher_retain", "select_and_reset", "repair"} <= set(stages)
            assert 0 < sum(stages.values()) <= run["seconds"]
        # and what their repair did: the rate the probe chose among the rates it tried, and the steps taken
        if run["method"] == "deepclean":
            repair = run["repair"]
            tried = repair["learning_rate_probe"]  # no trial when the reset did too little damage to tell rates apart
            assert f"{repair['learning_rate']:g}" in tried if tried else repair["learning_rate_probe_steps"] == 0
            assert repair["steps"] > 0
        else:
            assert "repair" not in run
    table = (output / "results.md").read_text()
    assert table.count("\n| ") == 6 and "gap_closed" in table
    assert "`deepclean` by stage (mean over seeds): fisher_forget" in table
    repair = next(run["repair"] for run in results["runs"] if run["method"] == "deepclean")
    assert (
        f"`deepclean` repair (seeds 0): rate {repair['learning_rate']:g}, steps {repair['steps']}, stopped early "
        f"{int(repair['stopped_early'])}/1, probe steps per trial {repair['learning_rate_probe_steps']}." in table
    )
    assert (output / "plots" / "digits_class.png").read_bytes()[:4] == b"\x89PNG"
    assert "digits_class" in capsys.readouterr().out
    # an existing report is not overwritten
    assert main(args) == 2 and "not empty" in capsys.readouterr().err


def test_evaluate_command_against_a_reference(tmp_path, text_model_dir, text_csv_files, capsys):
    output_file = tmp_path / "metrics.json"
    data = [
        "--dataset_name",
        "csv",
        "--data_files",
        f"train={text_csv_files / 'train.csv'}",
        f"test={text_csv_files / 'test.csv'}",
        "--forget",
        "random:0.2",
    ]
    args = [
        "evaluate",
        "--model_name_or_path",
        str(text_model_dir),
        *data,
        "--reference_model",
        str(text_model_dir),
        "--output_file",
        str(output_file),
        "--per_device_batch_size",
        "8",
    ]
    assert main(args) == 0
    results = json.loads(output_file.read_text())
    assert json.loads(capsys.readouterr().out) == results
    assert set(results) == {"model", "reference", "comparison"}
    assert {"forget_accuracy", "retain_loss", "test_accuracy", "mia_auc", "mia_efficacy"} <= set(results["model"])
    # the same model as its own reference: no gap at all
    assert results["comparison"]["avg_gap"] == 0.0
    assert all(value == 0.0 for key, value in results["comparison"].items() if key.endswith("_diff"))
    assert main(["evaluate", "--model_name_or_path", str(text_model_dir), *data, "--per_device_batch_size", "0"]) == 2
    assert "--per_device_batch_size: got 0" in capsys.readouterr().err


def test_per_parameter_selection_resets_the_same_share_of_every_tensor():
    generator = torch.Generator().manual_seed(0)
    # one tensor's ratios dwarf the other's: a global ranking would take only from it
    ratios = {"big": torch.rand(100, generator=generator) + 100.0, "small": torch.rand(50, generator=generator) + 0.1}
    masks = select_weights_to_reset(ratios, reset_fraction=0.2, selection_scope="per_parameter")
    assert int(masks["big"].sum()) == 20 and int(masks["small"].sum()) == 10
    assert bool(ratios["small"][masks["small"]].min() >= ratios["small"][~masks["small"]].max())
    global_masks = select_weights_to_reset(ratios, reset_fraction=0.2)
    assert int(global_masks["big"].sum()) == 30 and int(global_masks["small"].sum()) == 0
    with pytest.raises(DeepCleanError, match="--selection_scope: got 'layer'"):
        select_weights_to_reset(ratios, reset_fraction=0.2, selection_scope="layer")
    with pytest.raises(DeepCleanError, match="--selection_scope: got 'layer'"):
        DeepCleanConfig(selection_scope="layer")


def test_training_stops_when_asked():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, inputs, labels):
            return type("Output", (), {"loss": torch.nn.functional.cross_entropy(self.linear(inputs), labels)})()

    batches = [{"inputs": torch.randn(4, 2), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(5)]
    calls = []

    def should_stop(step):
        calls.append(step)
        return step == 3

    summary = train_model(
        Wrapper(), batches, Accelerator(cpu=True), epochs=2, learning_rate=0.1, should_stop=should_stop
    )
    assert summary["steps"] == 3 and summary["stopped_early"] and calls == [1, 2, 3]
    summary = train_model(Wrapper(), batches, Accelerator(cpu=True), epochs=2, learning_rate=0.1)
    assert summary["steps"] == 10 and not summary["stopped_early"]


def test_benchmark_script_on_two_processes_writes_one_report(tmp_path):
    output = tmp_path / "bench"
    script = str(Path(__file__).parents[1] / "scripts" / "benchmark.py")
    launch = torchrun_process([script, *small_benchmark_arguments(output)], timeout=600)
    assert launch.returncode == 0, launch.stdout[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert results["environment"]["num_processes"] == 2
    assert list(results["summary"]["digits_class"]) == ["original", "retrain", "finetune", "ssd", "deepclean"]
    # the main process alone writes and prints the report: one report folder, one copy of the tables
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench"]
    assert launch.stdout.count("### digits_class") == 1


def test_gap_closed_interval_resamples_seeds_in_pairs():
    from hf_deepclean.bench.report import gap_closed_interval

    gaps, original = [3.6, 2.5, 4.7, 3.0, 4.1], [4.9, 4.1, 5.7, 4.0, 5.5]
    interval = gap_closed_interval(gaps, original)
    assert interval["value"] == pytest.approx(1 - np.mean(gaps) / np.mean(original))
    assert interval["low"] < interval["value"] < interval["high"]
    # brute force: resample seeds (pairs) with replacement, percentile interval of the statistic
    rng = np.random.default_rng(1)
    picks = rng.integers(0, 5, size=(20000, 5))
    statistic = 1 - np.asarray(gaps)[picks].mean(axis=1) / np.asarray(original)[picks].mean(axis=1)
    assert interval["low"] == pytest.approx(np.percentile(statistic, 2.5), abs=0.01)
    assert interval["high"] == pytest.approx(np.percentile(statistic, 97.5), abs=0.01)
    assert gap_closed_interval(gaps, original) == interval  # seeded: the same interval every time
    few = gap_closed_interval(gaps[:2], original[:2])
    assert math.isnan(few["low"]) and math.isnan(few["high"])


def tiny_benchmark(output, *seeds: str) -> list[str]:
    """The smallest benchmark with DeepClean on it: 150 digits, 3 epochs, a 1-epoch repair."""
    return [
        *("benchmark", "--output_dir", str(output), "--scenarios", "digits_class", "--seeds", *seeds),
        *("--epochs", "3", "--max_train_rows", "150", "--methods", "deepclean", "--repair_epochs", "1"),
    ]


def test_reports_of_separate_seeds_merge_into_the_report_of_one_run(tmp_path, capsys, caplog):
    for name, seeds in {"seed0": ["0"], "seed1": ["1"], "both": ["0", "1"]}.items():
        assert main(tiny_benchmark(tmp_path / name, *seeds)) == 0
    argv = ["benchmark", "--merge_results"]

    def merge(output, *paths):
        return main([*argv[:1], "--output_dir", str(tmp_path / output), *argv[1:], *map(str, paths)])

    # the seed-0 run is in two reports, with the same metrics: kept once; the order of the reports does not matter
    assert merge("merged", tmp_path / "seed1", tmp_path / "seed0" / "results.json", tmp_path / "seed0") == 0
    together = json.loads((tmp_path / "both" / "results.json").read_text())
    results = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert together["complete"] is True and "complete" not in results
    # the repair's record shows each early-stopping check: every one before the last below the target, the last
    # at it exactly when early stopping ended the repair there
    for run in (run for run in together["runs"] if run["method"] == "deepclean"):
        repair = run["repair"]
        checks, target = repair["early_stopping_checks"], repair["early_stopping_target"]
        recovered = [check["retain_accuracy"] >= target for check in checks]
        assert checks and recovered == [False] * (len(checks) - 1) + [repair["stopped_early"]]
        assert repair["stopped_early"] == (checks[-1]["step"] == repair["steps"])
    key = ("scenario", "seed", "method")

    def by_run(runs):
        return {tuple(run[k] for k in key): run for run in runs}

    assert [tuple(run[k] for k in key) for run in results["runs"]] == [
        tuple(run[k] for k in key) for run in together["runs"]
    ]
    for name, run in by_run(together["runs"]).items():  # training is seeded: separate processes, the same models
        assert by_run(results["runs"])[name]["metrics"] == run["metrics"]
        assert by_run(results["runs"])[name]["avg_gap"] == run["avg_gap"]
    for method, entry in together["summary"]["digits_class"].items():
        mine = results["summary"]["digits_class"][method]
        assert mine["seeds"] == entry["seeds"] == 2
        timeless = {k: v for k, v in entry["mean"].items() if k not in ("seconds", "time_share_of_retrain")}
        assert {k: mine["mean"][k] for k in timeless} == timeless
        assert mine["gap_closed"]["value"] == entry["gap_closed"]["value"]
    assert [source["path"] for source in results["merged_from"]] == [
        str(tmp_path / name / "results.json") for name in ("seed1", "seed0", "seed0")
    ]
    table = (tmp_path / "merged" / "results.md").read_text()
    # each seed draws its forget set (here 3s of another sample): the merged heading gives each seed's, as the joint
    # run's does; a one-seed report heads its table with its own
    forget_sets = {run["seed"]: run["forget_set"] for run in together["runs"]}
    assert len(set(forget_sets.values())) == 2
    assert all(text.startswith("forget every training image of the digit 3 (") for text in forget_sets.values())
    heading = f"### digits_class\n\nForget sets: seed 0: {forget_sets[0]}; seed 1: {forget_sets[1]}.\n"
    assert heading in table and heading in (tmp_path / "both" / "results.md").read_text()
    assert f"### digits_class: {forget_sets[1]}\n" in (tmp_path / "seed1" / "results.md").read_text()
    # an older version's runs carry none: its report's one description stands, which the merge gives the runs of the
    # last seed it ran, and the other seeds are not recorded
    for name in ("seed0", "seed1", "both"):
        older = json.loads((tmp_path / name / "results.json").read_text())
        for run in older["runs"]:
            del run["forget_set"]
        (tmp_path / f"older_{name}.json").write_text(json.dumps(older))
    assert f"### digits_class: {forget_sets[1]}\n" in format_benchmark_tables(older)
    assert merge("older_seeds", tmp_path / "older_seed1.json", tmp_path / "older_seed0.json") == 0
    assert heading in (tmp_path / "older_seeds" / "results.md").read_text()
    assert merge("older_both", tmp_path / "older_both.json") == 0
    assert f"Forget sets: seed 0: not recorded; seed 1: {forget_sets[1]}.\n" in (
        (tmp_path / "older_both" / "results.md").read_text()
    )
    assert (
        "2 seed(s)" in table
        and "Partial" not in table
        and (tmp_path / "merged" / "plots" / "digits_class.png").exists()
    )
    capsys.readouterr()

    # --seeds keeps the runs of those seeds, and refuses seeds the reports lack
    assert merge("one", tmp_path / "both", "--seeds", "1") == 0
    kept = json.loads((tmp_path / "one" / "results.json").read_text())
    assert by_run(kept["runs"]) == {name: run for name, run in by_run(together["runs"]).items() if name[1] == 1}
    assert merge("none", tmp_path / "both", "--seeds", "1", "7") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("--seeds: got 1 7; the reports of --merge_results hold no run of seed(s) 7 (they hold 0 1).")
    assert not (tmp_path / "none").exists()

    # --scenarios splits a report of two scenarios (the reviews scenarios of one seed share their original model, so
    # run together) into one report each, with that scenario's description only; a scenario it lacks is refused
    two = json.loads(json.dumps(together))
    two["runs"] += [{**run, "scenario": "digits_random", "forget_set": "other"} for run in together["runs"]]
    two["scenarios"]["digits_random"] = "forget other rows"
    (tmp_path / "two.json").write_text(json.dumps(two))
    for scenario in ("digits_class", "digits_random"):
        assert merge(scenario, tmp_path / "two.json", "--scenarios", scenario) == 0
        alone = json.loads((tmp_path / scenario / "results.json").read_text())
        assert by_run(alone["runs"]) == {name: run for name, run in by_run(two["runs"]).items() if name[0] == scenario}
        assert alone["scenarios"] == {scenario: two["scenarios"][scenario]}
        assert list(alone["summary"]) == [scenario]
    assert merge("absent", tmp_path / "two.json", "--scenarios", "digits_class", "digits_mislabelled") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "--scenarios: got digits_class digits_mislabelled; the reports of --merge_results hold no run of scenario(s) "
        "digits_mislabelled (they hold digits_class digits_random)."
    )
    assert not (tmp_path / "absent").exists()
    only1 = json.loads(json.dumps(two))
    only1["runs"] = [run for run in two["runs"] if run["scenario"] == "digits_class" or run["seed"] == 1]
    (tmp_path / "only1.json").write_text(json.dumps(only1))
    assert merge("apart", tmp_path / "only1.json", "--scenarios", "digits_random", "--seeds", "0") == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--seeds, --scenarios: got 0 and digits_random; the reports of --merge_results hold no run of those seeds in "
            "those scenarios."
        )
    )
    assert not (tmp_path / "apart").exists()

    # refused in one line, with nothing written: a run found twice with other metrics (another model), reports of
    # another kind of machine (times do not compare) or other settings, and files that are not reports
    seed0 = json.loads((tmp_path / "seed0" / "results.json").read_text())

    def altered(name, change):
        report = json.loads(json.dumps(seed0))
        change(report)
        (tmp_path / name).write_text(json.dumps(report))

    altered("other_model.json", lambda r: r["runs"][-1]["metrics"].update(forget_accuracy=0.25))
    altered("elsewhere.json", lambda r: r["environment"].update(cpu_count=64))
    altered("settings.json", lambda r: r["arguments"]["deepclean"].update(repair_epochs=2.0))
    altered("rows.json", lambda r: r["arguments"]["benchmark"].update(max_train_rows=300))
    altered("no_environment.json", lambda r: r.update(environment=None))
    altered("no_seed.json", lambda r: r["runs"][0].pop("seed"))
    (tmp_path / "notes.txt").write_text("not a report")
    not_a_report = "; expected the results.json of a benchmark report or its folder."
    expected = {
        "other_model.json": "deepclean on digits_class seed 0 is in",
        "elsewhere.json": "differ in environment.cpu_count (2 and 64)",
        "rows.json": "differ in benchmark.max_train_rows (150 and 300)",
        "no_environment.json": f"got {str(tmp_path / 'no_environment.json')!r}{not_a_report}",
        "no_seed.json": f"got {str(tmp_path / 'no_seed.json')!r}{not_a_report}",
        "notes.txt": f"got {str(tmp_path / 'notes.txt')!r}{not_a_report}",
        "missing": f"got {str(tmp_path / 'missing')!r}{not_a_report}",
    }
    # a copy that recorded less (an older version) gets what the other copy recorded
    altered("older.json", lambda r: [run.pop("repair", None) for run in r["runs"]])
    assert merge("older", tmp_path / "older.json", tmp_path / "both", "--seeds", "0") == 0
    repaired = by_run(json.loads((tmp_path / "older" / "results.json").read_text())["runs"])
    assert (
        repaired[("digits_class", 0, "deepclean")]["repair"]
        == by_run(together["runs"])[("digits_class", 0, "deepclean")]["repair"]
    )
    # a loss that differs in its last float32 bits is the same model's
    altered(
        "last_bits.json",
        lambda r: r["runs"][-1]["metrics"].update(forget_loss=r["runs"][-1]["metrics"]["forget_loss"] * (1 + 5e-7)),
    )
    assert merge("last_bits", tmp_path / "both", tmp_path / "last_bits.json") == 0
    # other method settings are merged with a warning: a default's recorded form changes between versions
    with caplog.at_level("WARNING", logger="hf_deepclean.bench.merge"):
        assert merge("settings", tmp_path / "both", tmp_path / "settings.json") == 0
    assert "ran with other method settings: deepclean.repair_epochs (1.0 and 2.0); merged" in caplog.text
    # a merged report (which records its sources' arguments, not its own) merges again, with a later seed's report,
    # and is held to the same settings
    assert merge("again", tmp_path / "merged", tmp_path / "seed1") == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert by_run(again["runs"]) == by_run(results["runs"])
    assert again["merged_from"] == [*results["merged_from"], *results["merged_from"][:1]]  # the reports merged
    assert merge("refused", tmp_path / "merged", tmp_path / "rows.json") == 2
    assert "differ in benchmark.max_train_rows (150 and 300)" in capsys.readouterr().err
    for path, message in expected.items():
        assert merge("refused", tmp_path / "both", tmp_path / path) == 2, path
        error = capsys.readouterr().err.strip()
        assert "error: --merge_results: " in error and message in error, error
        assert len(error.splitlines()) == 1 and not (tmp_path / "refused").exists()


def test_a_stopped_benchmark_keeps_the_seeds_it_finished(tmp_path, monkeypatch):
    from hf_deepclean.bench import benchmark

    build = benchmark.build_scenario

    def build_until_seed_1(name, seed, args):
        if seed == 1:
            raise KeyboardInterrupt  # Ctrl-C, or a job's time limit, between two seeds
        return build(name, seed, args)

    monkeypatch.setattr(benchmark, "build_scenario", build_until_seed_1)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_benchmark(tmp_path / "bench", "0", "1"))
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert {run["seed"] for run in results["runs"]} == {0} and results["complete"] is False
    assert [run["method"] for run in results["runs"]] == ["original", "retrain", "deepclean"]
    table = (tmp_path / "bench" / "results.md").read_text()
    assert (
        table.startswith("Partial report: the run has finished digits_class seed 0 so far")
        and "### digits_class" in table
    )
