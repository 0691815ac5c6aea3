"""The causal-LM benchmark: the facts scenarios, their arguments, the report's forget-quality tables and plot, and a
tiny run of every LM method through `hf-deepclean benchmark`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator

from hf_deepclean.bench import benchmark as benchmark_module
from hf_deepclean.bench.benchmark import LANGUAGE_MODEL_DEFAULT_METHODS, BenchmarkArguments, train_original
from hf_deepclean.bench.report import format_benchmark_tables, summarize
from hf_deepclean.bench.scenarios import FACTS_SCENARIOS, build_facts_scenario
from hf_deepclean.cli import main
from hf_deepclean.errors import DeepCleanError


PEOPLE = 20
FULL_FINE_TUNE = [name for name in FACTS_SCENARIOS if not name.startswith("facts_lora_")]  # their adapter variants


@pytest.fixture(scope="module")
def levels():
    return {name: build_facts_scenario(name, seed=1, epochs=2, people=PEOPLE) for name in FULL_FINE_TUNE}


def test_facts_scenarios_forget_whole_people_and_share_their_original(levels):
    forgotten = {}
    for name, scenario in levels.items():
        people = scenario.train["person_id"]
        forget = set(scenario.forget_indices)
        forgotten[name] = {people[i] for i in forget}
        # every row about a forgotten person, and nothing else
        assert forget == {i for i, person in enumerate(people) if person in forgotten[name]}
        # the people's rows, and the world facts as questions and as statements
        assert -1 not in forgotten[name] and len(scenario.train) == 10 * PEOPLE + 2 * 60
        # each fact in two wordings: a biography restates its person's paraphrased answers, in order; a world fact
        # is trained with its answer and with its paraphrased answer
        for rows in (scenario.train, scenario.test):
            paraphrases = {}
            for row in rows:
                if row["kind"] == "qa" and row["person_id"] >= 0:
                    paraphrases.setdefault(row["person_id"], []).append(row["paraphrased_answer"])
            biographies = {row["person_id"]: row["text"] for row in rows if row["kind"] == "bio"}
            assert biographies == {person: " ".join(texts) for person, texts in paraphrases.items()}
        world = [row for row in scenario.train if row["person_id"] == -1]
        assert {row["text"] for row in world} == {
            f"{row['question']} {answer}"
            for row in world
            if row["kind"] == "qa"
            for answer in (row["answer"], row["paraphrased_answer"])
        }
        # held-out people are never trained on
        assert (
            not set(scenario.test["name"]) & set(scenario.train["name"]) and len(set(scenario.test["person_id"])) == 2
        )
        # every word of every text, answer option included, is in the vocabulary
        unknown = scenario.tokenizer.unk_token_id
        for rows in (scenario.train, scenario.test):
            for row in rows:
                texts = [row["text"], row["paraphrased_answer"], *row["perturbed_answers"]]
                assert all(unknown not in scenario.tokenizer(text)["input_ids"] for text in texts)
    assert [len(forgotten[name]) for name in FULL_FINE_TUNE] == [1, 1, 2]
    assert forgotten["facts_forget01"] <= forgotten["facts_forget10"]
    first, *others = levels.values()
    for scenario in others:  # the same training rows, vocabulary and initial weights: the same original model
        assert scenario.train["text"] == first.train["text"] and scenario.original_key == first.original_key
        assert scenario.tokenizer.get_vocab() == first.tokenizer.get_vocab()
        assert all(torch.equal(a, b) for a, b in zip(scenario.model.parameters(), first.model.parameters()))


def test_the_original_is_trained_once_for_the_levels_of_a_seed(monkeypatch):
    trained = []
    real = benchmark_module.train_from_state
    monkeypatch.setattr(benchmark_module, "train_from_state", lambda *a, **k: trained.append(1) or real(*a, **k))
    accelerator, originals = Accelerator(cpu=True), {}
    first = train_original(build_facts_scenario("facts_forget01", 1, 1, PEOPLE), accelerator, 1, 16, originals)
    second = train_original(build_facts_scenario("facts_forget10", 1, 1, PEOPLE), accelerator, 1, 16, originals)
    assert len(trained) == 1 and len(originals) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters()))
    assert len(second.forget) == 20 and len(first.forget) == 10  # the methods' rows are the level's own
    # trained from the scenario's initial weights, which the inputs keep for `retrain`
    assert not torch.equal(first.model.transformer.wte.weight, first.initial_state["transformer.wte.weight"])


def test_arguments_refuse_methods_that_do_not_fit_the_scenarios():
    with pytest.raises(DeepCleanError, match="--methods: got 'npo', a method for causal language models, with the "):
        BenchmarkArguments(scenarios=["digits_class"], methods=["npo"])
    with pytest.raises(DeepCleanError, match="--methods: got 'scrub', a method for classifiers, with the causal-LM"):
        BenchmarkArguments(scenarios=["facts_forget01"], methods=["retrain", "scrub"])
    with pytest.raises(DeepCleanError, match="--methods: got none, with --scenarios mixing"):
        BenchmarkArguments(scenarios=["digits_class", "facts_forget01"])
    with pytest.raises(DeepCleanError, match="--facts_people: got 5"):
        BenchmarkArguments(scenarios=["facts_forget01"], facts_people=5)
    assert BenchmarkArguments(scenarios=["facts_forget05"]).methods == list(LANGUAGE_MODEL_DEFAULT_METHODS)
    assert "salun" in BenchmarkArguments(scenarios=["digits_class"]).methods
    # methods for both kinds of model may mix scenarios
    assert BenchmarkArguments(scenarios=["digits_class", "facts_forget01"], methods=["finetune"]).methods == [
        "finetune"
    ]


def _runs():
    values = {"original": (1e-5, 0.40), "retrain": (1.0, 0.42), "npo": (0.04, 0.30)}
    seeds = {"original": (2e-6, 0.40), "retrain": (1.0, 0.40), "npo": (0.2, 0.36)}
    runs = []
    for method in values:
        for seed, (quality, utility) in enumerate((values[method], seeds[method])):
            metrics = {"forget_quality": quality, "model_utility": utility, "utility_share_of_original": utility / 0.4}
            metrics["retain_perplexity"] = 3.0e15 if method == "npo" else 1.5
            runs.append(
                {
                    "scenario": "facts_forget01",
                    "seed": seed,
                    "method": method,
                    "seconds": 2.0,
                    "time_share_of_retrain": 0.5,
                    "metrics": metrics,
                }
            )
    return runs


def test_summary_and_table_of_a_language_model_scenario():
    summary = summarize(_runs())["facts_forget01"]
    assert [summary[m]["forget_quality_passed"] for m in ("original", "retrain", "npo")] == [0, 2, 1]
    assert summary["npo"]["mean"]["forget_quality"] == pytest.approx(0.12)
    assert "gap_closed" not in summary["npo"] and "avg_gap" not in summary["npo"]["mean"]
    results = {
        "summary": {"facts_forget01": summary},
        "scenarios": {"facts_forget01": "forget 1 person"},
        "environment": {"device_name": "cpu", "device": "cpu", "num_processes": 1},
    }
    table = format_benchmark_tables(results)
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")
    }
    assert rows["method"][1:5] == ["forget_quality", "p ≥ 0.05", "model_utility", "utility / original"]
    # p-values below 0.001 in two significant digits, the others with three decimals; unknown columns dashed
    assert rows["original"][1:3] == ["6.0e-06 ± 4.0e-06", "0/2"]
    assert rows["npo"][1:4] == ["0.120 ± 0.080", "1/2", "0.330 ± 0.030"]
    assert rows["npo"][5] == "-" and rows["original"][5] == "-"
    # a diverged perplexity in scientific notation, a plain one with three decimals
    assert rows["npo"][-3] == "3.0e+15" and rows["original"][-3] == "1.500"
    assert "KS-test p-value" in table and "avg_gap:" not in table


def test_tiny_facts_benchmark_runs_every_language_model_method(tmp_path, capsys):
    output = tmp_path / "bench"
    methods = ["original", "retrain", "gradient_ascent", "gradient_difference", "npo", "simnpo", "deepclean"]
    args = [
        *("benchmark", "--output_dir", str(output), "--scenarios", "facts_forget10", "--seeds", "0"),
        *("--facts_people", str(PEOPLE), "--epochs", "6", "--repair_epochs", "1", "--max_eval_samples", "20"),
        *("--methods", *methods),
    ]
    assert main(args) == 0
    results = json.loads((output / "results.json").read_text())
    summary = results["summary"]["facts_forget10"]
    assert list(summary) == methods
    runs = {run["method"]: run for run in results["runs"]}
    # the reference against itself: forget quality 1 (identical truth ratios), PrivLeak 0
    assert runs["retrain"]["metrics"]["forget_quality"] == 1.0 and runs["retrain"]["metrics"]["ks_statistic"] == 0.0
    assert runs["retrain"]["metrics"]["privleak"] == 0.0
    assert runs["original"]["metrics"]["utility_share_of_original"] == 1.0
    for run in runs.values():
        metrics = run["metrics"]
        assert 0 <= metrics["forget_quality"] <= 1 and 0 <= metrics["model_utility"] <= 1
        for key in ("mia_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc", "forget_rouge_l"):
            assert 0 <= metrics[key] <= 1, key
        assert metrics["retain_perplexity"] > 1 and math.isfinite(metrics["privleak"])
        assert run["time_share_of_retrain"] == pytest.approx(run["seconds"] / runs["retrain"]["seconds"])
        assert summary[run["method"]]["forget_quality_passed"] == int(metrics["forget_quality"] >= 0.05)
    # the utility numbers: retain questions and world facts, TOFU's harmonic mean of the six
    six = [
        runs["original"]["metrics"][f"{s}_{k}"]
        for s in ("retain", "general")
        for k in ("probability", "rouge_l_recall", "truth_ratio")
    ]
    assert runs["original"]["metrics"]["model_utility"] == pytest.approx(len(six) / sum(1 / v for v in six))
    # gradient ascent on the forget rows raises their loss above the original's
    assert runs["gradient_ascent"]["metrics"]["forget_loss"] > runs["original"]["metrics"]["forget_loss"]
    table = (output / "results.md").read_text()
    assert table.count("\n| ") == len(methods) + 1 and "forget_quality" in table
    assert (output / "plots" / "facts_forget10.png").read_bytes()[:4] == b"\x89PNG"
    assert "facts_forget10" in capsys.readouterr().out


def test_benchmark_help_lists_the_language_model_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--facts_people", "--npo_beta", "--simnpo_beta", "--simnpo_gamma", "--llm_retain_weight"):
        assert option in out


@pytest.mark.parametrize("tolerance", [100.0, 0.0])
def test_benchmark_early_stopping_watches_retain_perplexity_of_a_causal_lm(tmp_path, monkeypatch, tolerance):
    """`--early_stopping` on a facts scenario: DeepClean's repair is watched on retain perplexity against the
    original's. A tolerance no reset can exceed ends the repair at the first check; none leaves it running past it."""
    from hf_deepclean.pipeline import deepclean as deepclean_module

    monitors = []
    build = deepclean_module.build_repair_monitor

    def spy(*args, **kwargs):
        monitors.append(build(*args, **kwargs))
        return monitors[-1]

    monkeypatch.setattr(deepclean_module, "build_repair_monitor", spy)
    args = [
        *("benchmark", "--output_dir", str(tmp_path / "bench"), "--scenarios", "facts_forget10", "--seeds", "0"),
        *("--facts_people", str(PEOPLE), "--epochs", "6", "--repair_epochs", "2", "--max_eval_samples", "20"),
        *("--methods", "original", "deepclean", "--early_stopping"),
        *("--early_stopping_perplexity_tolerance", str(tolerance), "--learning_rate", "1e-3"),
    ]
    assert main(args) == 0
    (monitor,) = monitors
    assert monitor.language_model and monitor.target_retain_accuracy is None
    history = monitor.history
    assert history and all("retain_perplexity" in check for check in history)
    if tolerance:
        assert len(history) == 1 and history[0]["retain_perplexity"] <= monitor.target_retain_perplexity
    else:  # the original's own perplexity is not reached at the first check (the reset raised it)
        assert history[0]["retain_perplexity"] > monitor.target_retain_perplexity


def test_adapter_facts_scenario_pretrains_a_base_on_other_people_and_trains_only_the_adapter(monkeypatch):
    from hf_deepclean.bench import baselines
    from hf_deepclean.bench.facts import build_facts
    from hf_deepclean.config import DeepCleanConfig

    scenario = build_facts_scenario("facts_lora_forget10", seed=1, epochs=1, people=PEOPLE)
    full = build_facts_scenario("facts_forget10", seed=1, epochs=1, people=PEOPLE)
    # the same rows to learn and forget as the full fine-tune; the pretraining people are none of them
    assert scenario.train["text"] == full.train["text"] and scenario.forget_indices == full.forget_indices
    pretraining, _ = scenario.pretraining
    splits = build_facts(PEOPLE, 1, held_out_people=2)["forget10"]
    scenario_names = set(splits["train"]["name"]) | set(splits["held_out"]["name"])
    pretrained_names = {name for name in pretraining["name"] if name}
    assert len(pretrained_names) >= PEOPLE // 2 and not pretrained_names & scenario_names
    vocabulary = scenario.tokenizer.get_vocab()
    assert all(token in vocabulary for text in pretraining["text"] for token in scenario.tokenizer.tokenize(text))

    trained = []
    real = benchmark_module.train_from_state
    monkeypatch.setattr(benchmark_module, "train_from_state", lambda *a, **k: trained.append(a[3]) or real(*a, **k))
    accelerator, originals = Accelerator(cpu=True), {}
    inputs = train_original(scenario, accelerator, 1, 16, originals)
    again = train_original(build_facts_scenario("facts_lora_forget01", 1, 1, PEOPLE), accelerator, 1, 16, originals)
    assert len(trained) == 2  # the base's pretraining and the adapter's training, once for both levels
    assert all(torch.equal(a, b) for a, b in zip(inputs.model.parameters(), again.model.parameters()))
    assert inputs.initial_state.keys() == again.initial_state.keys()
    assert all(torch.equal(inputs.initial_state[k], again.initial_state[k]) for k in inputs.initial_state)

    def changed(model, reference):
        return {name for name, value in model.state_dict().items() if not torch.equal(value, reference[name])}

    fresh = build_gpt2_state(scenario)
    base_names = {name for name in inputs.initial_state if "lora_" not in name}
    # the initial state holds a pretrained base (not the fresh draw) and the adapter; training moved the adapter only
    wte = "base_model.model.transformer.wte.weight"
    assert wte in base_names and not torch.equal(inputs.initial_state[wte], fresh["transformer.wte.weight"])
    moved = changed(inputs.model, inputs.initial_state)
    assert moved and all("lora_" in name for name in moved)
    retrained = baselines.retrain(inputs, DeepCleanConfig(), baselines.BaselineConfig())
    assert not changed(retrained, inputs.initial_state) & base_names
    cleaned = baselines.deepclean(
        inputs, DeepCleanConfig(repair_epochs=1, scope="adapter"), baselines.BaselineConfig()
    )
    assert not changed(cleaned, inputs.initial_state) & base_names
    assert changed(cleaned, inputs.model.state_dict())


def build_gpt2_state(scenario):
    from hf_deepclean.bench.causal_lm_demo import build_gpt2
    from hf_deepclean.bench.scenarios import FACTS_MAX_LENGTH

    fresh = build_gpt2(len(scenario.tokenizer), n_embd=64, n_layer=2, seed=1, n_positions=FACTS_MAX_LENGTH)
    return fresh.state_dict()


def test_language_model_benchmark_on_two_processes_writes_one_report(tmp_path):
    """The facts benchmark under torchrun: data-parallel training, Fisher passes and LM metrics, one report."""
    from pathlib import Path

    from conftest import torchrun_process

    output = tmp_path / "bench"
    script = str(Path(__file__).parents[1] / "scripts" / "benchmark.py")
    methods = ["original", "retrain", "npo", "deepclean"]
    arguments = [
        *("--output_dir", str(output), "--scenarios", "facts_forget10", "--seeds", "0", "--methods", *methods),
        *("--facts_people", str(PEOPLE), "--epochs", "3", "--repair_epochs", "1", "--max_eval_samples", "20"),
    ]
    launch = torchrun_process([script, *arguments], timeout=600)
    assert launch.returncode == 0, launch.stdout[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert results["environment"]["num_processes"] == 2
    assert list(results["summary"]["facts_forget10"]) == methods
    runs = {run["method"]: run["metrics"] for run in results["runs"]}
    # the metrics gathered from both processes: the reference against itself, valid values for every method
    assert runs["retrain"]["forget_quality"] == 1.0 and runs["retrain"]["privleak"] == 0.0
    for metrics in runs.values():
        assert 0 <= metrics["forget_quality"] <= 1 and 0 < metrics["model_utility"] <= 1
        assert 0 <= metrics["mia_min_k_auc"] <= 1 and metrics["retain_perplexity"] > 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench"]
    assert launch.stdout.count("### facts_forget10") == 1
