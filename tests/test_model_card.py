"""The model card: a golden rendering, its plots and their histogram summaries, and rendering from an installed wheel.

The golden example lives in `model_cards/example/`: the two reports of a real run (the demo's, with Hub ids in
place of its local folders) and the card and plots rendered from them. After an intended change to the card,
regenerate it with `UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_model_card.py -k golden` and review the
diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.hub.model_card import render_model_card, save_model_card
from hf_deepclean.hub.plots import PLOT_FILES, available_plots, fisher_ratio_histogram, loss_histograms
from hf_deepclean.hub.push import commit_message, read_reports


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "model_cards" / "example"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# offline and quiet: the build backend (hatchling) comes from the dev extra, nothing is fetched
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def test_card_matches_the_golden_example(tmp_path):
    config, results = read_reports(EXAMPLE)
    save_model_card(tmp_path, config, results)
    if os.environ.get("UPDATE_GOLDEN"):
        for name in ["README.md", *PLOT_FILES.values()]:
            shutil.copy(tmp_path / name, EXAMPLE / name)
    assert (tmp_path / "README.md").read_text() == (EXAMPLE / "README.md").read_text()
    # every plot the card embeds was written next to it, as a PNG
    card = ModelCard.load(tmp_path / "README.md")
    for name in PLOT_FILES.values():
        assert f"]({name})" in card.text
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_card_lists_every_hyperparameter_and_no_local_path():
    config, results = read_reports(EXAMPLE)
    text = render_model_card(config, results).text
    for field in fields(DeepCleanConfig):
        assert f"| `{field.name}` | `{config.arguments[field.name]}` |" in text
    assert f"| `seed` | `{config.arguments['seed']}` |" in text
    assert f"| `num_processes` | `{config.num_processes}` |" in text
    assert "arXiv 2311.10448" in text and "Shi, Jiaeli" in text
    # a local folder is named by its last part only
    config.arguments["model_name_or_path"] = "/home/someone/private/models/digits-vit"
    text = render_model_card(config, results).text
    assert "/home/someone" not in text and "digits-vit (local folder)" in text


def test_card_without_histograms_embeds_only_what_exists(tmp_path):
    """Reports written before the histograms existed still render, without the plots they have no data for."""
    config, results = read_reports(EXAMPLE)
    results.ratio_histogram, results.loss_histograms = {}, {}
    assert available_plots(results) == {"reset_per_module": PLOT_FILES["reset_per_module"]}
    save_model_card(tmp_path, config, results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", PLOT_FILES["reset_per_module"]]
    text = (tmp_path / "README.md").read_text()
    assert PLOT_FILES["losses"] not in text and PLOT_FILES["fisher_ratios"] not in text


def test_commit_message_summarises_the_run_without_rows():
    config, results = read_reports(EXAMPLE)
    summary, description = commit_message(config, results)
    before, after = results.metrics_before, results.metrics_after
    assert summary == (
        f"DeepClean: forget {config.forget.num_rows} rows of {config.arguments['dataset_name']}, "
        f"forget_accuracy {before['forget_accuracy']:.3f} -> {after['forget_accuracy']:.3f}"
    )
    assert config.forget.sha256 in description
    assert f"mia_auc {before['mia_auc']:.4f} -> {after['mia_auc']:.4f}" in description


def test_card_and_commit_name_the_base_of_a_base_reset():
    """`--reset base`: the card and the commit name the base model (a local folder by its last part only) and list
    the parameters that fell back to fresh values."""
    config, results = read_reports(EXAMPLE)
    config.arguments.update(
        reset="base", base_model_name_or_path="/home/someone/private/models/minilm", base_model_revision="main"
    )
    results.reset.mode, results.reset.init_fallback = "base", ["classifier.weight", "classifier.bias"]
    results.reset.base_model, results.reset.base_model_revision = "/home/someone/private/models/minilm", "main"
    text = render_model_card(config, results).text
    assert "/home/someone" not in text
    assert "reset to the values of the base model minilm (local folder) (revision main)" in text
    assert "2 selected parameter tensor(s) that the base model lacks" in text and "`classifier.bias`" in text
    _, description = commit_message(config, results)
    assert "reset=base to minilm (local folder))" in description and "/home/someone" not in description


def test_fisher_ratio_histogram_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    ratios = {
        "a.weight": torch.rand(7, 5, generator=generator) * 10.0 ** torch.randint(-8, 4, (7, 5), generator=generator),
        "b.bias": torch.tensor([0.0, 0.0, 3.0, 1e-20]),
    }
    masks = {"a.weight": ratios["a.weight"] > 5.0, "b.bias": torch.tensor([False, False, True, False])}
    histogram = fisher_ratio_histogram(ratios, masks, bins=12)

    values = torch.cat([r.flatten() for r in ratios.values()]).double()
    logs = values[values > 0].log10().numpy()
    counts, edges = np.histogram(logs, bins=12, range=(logs.min(), logs.max()))
    assert histogram["counts"] == counts.tolist()
    assert np.allclose(histogram["bin_edges"], edges, atol=1e-6)
    assert histogram["zeros"] == 2 and histogram["total"] == 39
    selected = torch.cat([r[m] for r, m in zip(ratios.values(), masks.values())])
    assert histogram["selected"] == selected.numel()
    assert histogram["threshold"] == pytest.approx(float(selected.min()))


def test_fisher_ratio_histogram_without_selection_or_information():
    histogram = fisher_ratio_histogram({"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.bool)}, bins=4)
    assert histogram["counts"] == [0, 0, 0, 0]
    assert histogram["zeros"] == 3 and histogram["selected"] == 0 and histogram["threshold"] is None


def test_loss_histograms_share_bins_and_keep_every_row():
    rng = np.random.default_rng(0)
    outputs = {
        "before": {"forget": {"loss": rng.exponential(0.01, 9)}, "test": {"loss": rng.exponential(1.0, 30)}},
        "after": {"forget": {"loss": np.array([0.0, 2.0, 5.0])}, "retain": {"loss": np.ones(4)}},
    }
    histograms = loss_histograms(outputs, bins=10)
    assert set(histograms["counts"]) == {"before", "after"}
    assert set(histograms["counts"]["after"]) == {"forget"}  # retain is not plotted, test is absent after
    assert sum(histograms["counts"]["before"]["forget"]) == 9
    assert sum(histograms["counts"]["before"]["test"]) == 30
    # shared log-spaced bins from the smallest to the largest loss of any stage and split
    edges = np.asarray(histograms["bin_edges"])
    every = np.concatenate([outputs["before"]["forget"]["loss"], outputs["before"]["test"]["loss"], [2.0, 5.0]])
    assert len(edges) == 11 and np.allclose(np.diff(np.log10(edges)), np.diff(np.log10(edges))[0], rtol=1e-4)
    assert edges[0] == pytest.approx(1e-6) and edges[-1] == pytest.approx(every.max(), rel=1e-5)
    # each row sits in the bin its value falls in; a loss of exactly 0 counts in the first bin
    for stage, split in (("before", "forget"), ("before", "test"), ("after", "forget")):
        values = np.clip(outputs[stage][split]["loss"], 1e-6, None)
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 9)
        assert histograms["counts"][stage][split] == np.bincount(index, minlength=10).tolist()
    assert loss_histograms({"before": {"forget": {"loss": np.zeros(0)}}}) == {"bin_edges": [], "counts": {}}
    # a row without a loss (a sequence with no predicted token: NaN) is left out; the others keep their bins
    with_nan = {"before": {"forget": {"loss": np.array([np.nan, 0.5, 2.0])}}}
    assert loss_histograms(with_nan, bins=4) == loss_histograms(
        {"before": {"forget": {"loss": np.array([0.5, 2.0])}}}, bins=4
    )
    assert loss_histograms({"before": {"forget": {"loss": np.array([np.nan])}}}) == {"bin_edges": [], "counts": {}}


RENDER_FROM_INSTALLED = """
import sys
from pathlib import Path
import hf_deepclean
from hf_deepclean.hub.push import read_reports
from hf_deepclean.hub.model_card import render_model_card, template_path

site, example = Path(sys.argv[1]), Path(sys.argv[2])
assert Path(hf_deepclean.__file__).is_relative_to(site), hf_deepclean.__file__
assert template_path().is_relative_to(site), template_path()
sys.stdout.write(str(render_model_card(*read_reports(example))))
"""


def test_card_renders_after_a_plain_pip_install(tmp_path):
    """`pip install .` (not editable) into a separate folder: the template ships inside the package."""
    site = tmp_path / "site"
    build = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path, ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_deepclean-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "hf_deepclean/model_cards/deepclean_template.md" in names
    assert not any(name.startswith("hf_deepclean/model_cards/example") for name in names)
    install = subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # run outside the source tree, with the installed copy first on the path (the editable one comes later)
    rendered = subprocess.run(
        [sys.executable, "-c", RENDER_FROM_INSTALLED, site, EXAMPLE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert rendered.stdout == (EXAMPLE / "README.md").read_text()
