"""The benchmark scripts run (tiny sizes) and print the table they promise; the figures themselves are measured by
hand on an idle machine and recorded in the README, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


SCRIPTS = Path(__file__).parent.parent / "scripts"


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `scripts/<name>` on one thread; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_benchmark_fisher_quick_prints_one_row_per_model():
    result = run_script(
        "benchmark_fisher.py",
        "--quick",
        "--no-memory",
        "--threads",
        "1",
        "--models",
        "mlp-digits,bert-minilm,gpt2-small",
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].split()[1] for row in rows] == ["MLP", "BERT", "GPT-2"]
    for row in rows:
        ratios = row.split(" | ")[2:5]
        assert all(re.fullmatch(r"\d+\.\d\d", value) for value in ratios), row


def test_repair_trajectory_prints_a_line_per_quarter_epoch():
    result = run_script(
        "repair_trajectory.py", "--epochs", "1", "--repair_epochs", "0.5", "--reset_fractions", "0.5", TQDM_DISABLE="1"
    )
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"original avg_gap \d+\.\d\d", lines[0])
    checks = [line for line in lines if line.startswith("share 0.5 epoch ")]
    assert [line.split()[3].rstrip(":") for line in checks] == ["0.24", "0.49"]  # 41 steps an epoch, checks every 10
    assert all("avg_gap" in line and "mia_efficacy" in line for line in checks)


def test_fisher_subsample_compares_sample_selections_with_the_full_one(tmp_path):
    import importlib.util
    import json

    import torch

    spec = importlib.util.spec_from_file_location("fisher_subsample", SCRIPTS / "fisher_subsample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, False])}
    assert module.agreement(reference, reference) == 1.0
    assert module.agreement({"a": ~reference["a"], "b": ~reference["b"]}, reference) == 0.0
    assert module.agreement({"a": torch.tensor([True, False, True, False]), "b": reference["b"]}, reference) == 2 / 3

    result = run_script(
        "fisher_subsample.py",
        *("--scenario", "digits_class", "--max_train_rows", "150", "--epochs", "2", "--seeds", "0"),
        *("--sizes", "16", "64", "--draws", "2", "--output_dir", str(tmp_path)),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("seed 0:")]
    assert [line.split(" of ")[0] for line in lines] == ["seed 0: 16", "seed 0: 64"]
    saved = json.loads((tmp_path / "fisher_subsample.json").read_text())
    scores = saved["seeds"]["0"]["agreement"]
    assert sorted(scores) == ["16", "64"] and all(
        len(draws) == 2 and all(0 <= s <= 1 for s in draws) for draws in scores.values()
    )
    assert (tmp_path / "fisher_subsample.png").read_bytes()[:4] == b"\x89PNG"


def test_tune_deepclean_sets_the_probe_settings_of_a_grid_entry_for_its_runs_only(monkeypatch):
    import importlib.util

    from hf_deepclean.bench import baselines
    from hf_deepclean.unlearning import probe

    spec = importlib.util.spec_from_file_location("tune_deepclean", SCRIPTS / "tune_deepclean.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    seen = []

    def run_deepclean(model, rows, config, *args, **kwargs):
        seen.append((config, probe.KEEP_CHOSEN_TRIAL, probe.PROBE_MIN_DAMAGE))

    monkeypatch.setattr(baselines, "run_deepclean", run_deepclean)
    keep, trials, plain = object(), object(), object()
    tune.probe_setting_runs(
        {id(keep): tune.GRID["probe_keep"]["probe"], id(trials): tune.GRID["probe_trials"]["probe"]}
    )
    for config in (keep, plain, trials, plain):
        baselines.run_deepclean(None, None, config)
    default = (probe.KEEP_CHOSEN_TRIAL, probe.PROBE_MIN_DAMAGE)
    assert default == (False, 0.05)
    assert [values for _, *values in seen] == [
        [True, 0.05],
        list(default),
        [False, float("-inf")],
        list(default),
    ]
