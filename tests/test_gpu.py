"""Checks that need a CUDA device (`pytest -m gpu`); skipped without one, deselected by default.

They prove the engine's per-layer rules are exact on GPU kernels too (TF32 off, so float32 products stay float32),
that accumulators stay float32 under bf16 autocast, that a masked repair keeps unselected weights bit-for-bit on
the GPU, and that `hf-deepclean unlearn` runs end to end on it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_bert, build_tiny_vit, make_reviews
from test_fisher import (
    assert_fisher_close,
    brute_force_fisher,
    build_tiny_gpt2,
    build_tiny_resnet,
    image_batches,
    lm_batches,
    relative_error,
    text_batches,
)

from hf_deepclean.fisher.engine import compute_fisher_diagonal


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("kind", ["bert", "vit", "resnet", "gpt2"])
def test_engine_matches_brute_force_on_cuda(kind):
    if kind == "bert":
        model, tokenizer = build_tiny_bert()
        batches = text_batches(tokenizer, make_reviews(11, seed=1), 4)
    elif kind == "vit":
        model, _ = build_tiny_vit()
        batches = image_batches()
    elif kind == "resnet":
        model = build_tiny_resnet()
        batches = image_batches(num_labels=5)
    else:
        model = build_tiny_gpt2()
        batches = lm_batches()
    model, batches = model.cuda(), _to(batches, "cuda")
    fisher = compute_fisher_diagonal(model, batches)
    assert all(v.device.type == "cuda" for v in fisher.values())
    assert_fisher_close(fisher, brute_force_fisher(model, batches))


def test_bf16_autocast_accumulates_in_float32_on_cuda():
    model, tokenizer = build_tiny_bert()
    batches = _to(text_batches(tokenizer, make_reviews(14, seed=1), 7), "cuda")
    reference = compute_fisher_diagonal(model.cuda(), batches)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        fisher = compute_fisher_diagonal(model, batches)
    for name, values in fisher.items():
        assert values.dtype == torch.float32 and bool(torch.isfinite(values).all()), name
    assert 0 < relative_error(fisher["classifier.weight"], reference["classifier.weight"]) < 0.1


def test_masked_repair_keeps_unselected_weights_on_cuda():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_deepclean.unlearning.training import train_model

    model, tokenizer = build_tiny_bert()
    accelerator = Accelerator()
    generator = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=generator) < 0.2 for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = DataLoader(text_batches(tokenizer, make_reviews(16, seed=3), 4), batch_size=None)
    model, loader = accelerator.prepare(model, loader)
    train_model(model, loader, accelerator, epochs=2, learning_rate=1e-2, weight_decay=0.1, masks=masks)
    changed = 0
    for name, p in accelerator.unwrap_model(model).named_parameters():
        p = p.detach().cpu()
        assert torch.equal(p[~masks[name]], before[name][~masks[name]]), name
        changed += int((p != before[name]).sum())
    assert changed > 0


def test_unlearn_cli_on_cuda(tmp_path, text_model_dir, text_csv_files):
    from hf_deepclean.cli import main

    output = tmp_path / "cleaned"
    args = ["unlearn", "--model_name_or_path", str(text_model_dir), "--dataset_name", "csv", "--data_files"]
    args += [f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}"]
    args += ["--forget", "class:pos", "--output_dir", str(output), "--repair_epochs", "1"]
    from accelerate import PartialState

    assert PartialState().device.type == "cuda"  # what the unlearner's Accelerator picks
    assert main(args) == 0
    results = json.loads((output / "deepclean_results.json").read_text())
    assert results["fisher"]["forget_samples"] > 0
    assert (output / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_self_check_passes_under_bf16_autocast_on_cuda(kind):
    """`--fisher_check` under mixed precision: the engine and the per-sample reference both run in bf16, and their
    rounding differs; the run's tolerance there (3e-2) must not stop a correct engine, and must still be far below
    the error of a wrong rule (a factor of 4 on a squared gradient)."""
    from hf_deepclean.fisher.check import check_fisher_engine

    if kind == "bert":
        model, tokenizer = build_tiny_bert()
        batch = text_batches(tokenizer, make_reviews(8, 3), 8)[0]
    else:
        model, batch = build_tiny_gpt2(), lm_batches()[0]
    model = model.cuda().eval()
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = check_fisher_engine(model, batch, rtol=3e-2)
    assert result.max_relative_error < 3e-2
