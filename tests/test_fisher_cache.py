"""`hf-deepclean fisher` and `unlearn --fisher_cache`: additivity of Fisher sums, and refusal of stale caches."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_bert
from safetensors import safe_open
from test_fisher import assert_fisher_close

from hf_deepclean.cli import main
from hf_deepclean.config import DataArguments, DeepCleanConfig, ModelArguments
from hf_deepclean.fisher.cache import load_fisher_sums
from hf_deepclean.modeling import get_parameters_in_scope
from hf_deepclean.pipeline.deepclean import compute_fisher_diagonals
from hf_deepclean.pipeline.fisher_sums import load_checked_fisher_cache
from hf_deepclean.pipeline.session import DeepCleanSession
from hf_deepclean.records import StageTimer


def _data_flags(csv_dir, train="train.csv"):
    return ["--dataset_name", "csv", "--data_files", f"train={csv_dir / train}", f"test={csv_dir / 'test.csv'}"]


def _fisher_cli(model_dir, csv_dir, output, *extra, train="train.csv"):
    return main(
        [
            "fisher",
            "--model_name_or_path",
            str(model_dir),
            *_data_flags(csv_dir, train),
            "--fisher_output",
            str(output),
            "--per_device_batch_size",
            "8",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, text_model_dir, text_csv_files):
    output = tmp_path_factory.mktemp("cache") / "fisher.safetensors"
    assert _fisher_cli(text_model_dir, text_csv_files, output) == 0
    return output


def _fisher(model_dir, csv_dir, forget, **method):
    """Fisher diagonals of the forget and retain rows, computed by the pipeline's own stage."""
    config = DeepCleanConfig(per_device_batch_size=8, **method)
    data_files = [f"train={csv_dir / 'train.csv'}", f"test={csv_dir / 'test.csv'}"]
    session = DeepCleanSession.load(
        ModelArguments(str(model_dir)),
        DataArguments("csv", forget=forget, data_files=data_files),
        seed=42,
        batch_size=8,
    )
    cache = load_checked_fisher_cache(session, config) if config.fisher_cache is not None else None
    params = get_parameters_in_scope(session.unwrapped_model)
    return compute_fisher_diagonals(
        session.model, session.rows(), config, session.accelerator, params, cache, StageTimer()
    )


def test_cache_file_describes_its_sums(cache_file, text_model_dir):
    sums, info = load_fisher_sums(cache_file)
    assert info.count == info.num_rows == 60 and info.split == "train"
    assert (info.fisher_type, info.scope) == ("empirical", "all")
    model, _ = build_tiny_bert()
    assert set(sums) == {name for name, _ in model.named_parameters()}
    assert all(v.dtype == torch.float32 for v in sums.values())
    with safe_open(str(cache_file), framework="pt") as handle:
        assert handle.metadata()["format"] == "hf_deepclean.fisher_sums/1"


@pytest.mark.parametrize("forget", ["class:pos", "random:7"])
def test_retain_fisher_from_cache_equals_a_retain_pass(cache_file, text_model_dir, text_csv_files, tmp_path, forget):
    """(S_all - S_forget) / (N - N_forget) against a pass over the retain rows."""
    expected, record = _fisher(text_model_dir, text_csv_files, forget)
    assert record.retain_source == "pass"

    fisher, record = _fisher(text_model_dir, text_csv_files, forget, fisher_cache=str(cache_file))
    assert record.retain_source == "cache"
    assert record.retain_samples == 60 - record.forget_samples
    assert_fisher_close(fisher["forget"], expected["forget"], rtol=1e-6)
    # subtraction of float32 sums loses a little relative precision where the retain part is small
    assert_fisher_close(fisher["retain"], expected["retain"], rtol=1e-4)


def test_unlearn_with_cache_end_to_end(cache_file, text_model_dir, text_csv_files, tmp_path):
    import json

    output = tmp_path / "cleaned"
    args = ["unlearn", "--model_name_or_path", str(text_model_dir), *_data_flags(text_csv_files)]
    args += ["--forget", "class:pos", "--output_dir", str(output), "--repair_epochs", "1"]
    assert main([*args, "--fisher_cache", str(cache_file)]) == 0
    results = json.loads((output / "deepclean_results.json").read_text())
    assert results["fisher"]["retain_source"] == "cache"


def test_cache_of_other_weights_is_refused(cache_file, tmp_path, text_csv_files, capsys):
    other_model = tmp_path / "other-model"
    model, tokenizer = build_tiny_bert(seed=1)
    model.save_pretrained(other_model)
    tokenizer.save_pretrained(other_model)
    capsys.readouterr()
    args = ["unlearn", "--model_name_or_path", str(other_model), *_data_flags(text_csv_files), "--forget", "class:pos"]
    assert main([*args, "--fisher_cache", str(cache_file), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (progress bars of the load come first)
    assert err.startswith("hf-deepclean unlearn: error: --fisher_cache") and "model weights" in err, err
    assert not (tmp_path / "out").exists()


def test_stale_data_and_settings_are_refused(cache_file, text_model_dir, text_csv_files, tmp_path, capsys):
    import shutil

    other_data = tmp_path / "data"
    other_data.mkdir()
    rows = (text_csv_files / "train.csv").read_text().splitlines()
    (other_data / "train.csv").write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    shutil.copy(text_csv_files / "test.csv", other_data / "test.csv")
    base = ["unlearn", "--model_name_or_path", str(text_model_dir), "--forget", "class:pos"]
    base += ["--fisher_cache", str(cache_file), "--output_dir", str(tmp_path / "out")]
    for data_dir, extra, meaning in (
        (other_data, [], "training data"),
        (text_csv_files, ["--fisher_type", "true"], "--fisher_type"),
    ):
        assert main([*base, *_data_flags(data_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert "--fisher_cache" in err and meaning in err, err
    assert not (tmp_path / "out").exists()


def test_fisher_output_is_not_overwritten(cache_file, text_model_dir, text_csv_files, capsys):
    before = cache_file.read_bytes()
    assert _fisher_cli(text_model_dir, text_csv_files, cache_file) == 2
    assert "--fisher_output" in capsys.readouterr().err
    assert cache_file.read_bytes() == before
    assert _fisher_cli(text_model_dir, text_csv_files, cache_file.with_suffix(".bin")) == 2
    assert "expected a path ending in .safetensors" in capsys.readouterr().err


def test_fisher_over_forget_rows(tmp_path, text_model_dir, text_csv_files):
    output = tmp_path / "forget.safetensors"
    assert _fisher_cli(text_model_dir, text_csv_files, output, "--forget", "class:pos") == 0
    _, info = load_fisher_sums(output)
    assert 0 < info.count < info.num_rows == 60


def test_fisher_command_under_two_processes(cache_file, text_model_dir, text_csv_files, tmp_path):
    """`torchrun --nproc_per_node 2 -m hf_deepclean.cli fisher` on a machine without GPUs: one gloo process group
    (not two independent copies), each rank a shard, one file written by rank 0, equal to the one-process cache."""
    from conftest import run_torchrun

    output = tmp_path / "two.safetensors"
    arguments = ["-m", "hf_deepclean.cli", "fisher", "--model_name_or_path", str(text_model_dir)]
    arguments += [*_data_flags(text_csv_files), "--fisher_output", str(output), "--per_device_batch_size", "8"]
    log = run_torchrun(arguments)
    assert output.exists(), log[-3000:]
    assert log.count("Fisher sums over 60 rows") == 1, log[-3000:]  # printed by rank 0 only
    two, two_info = load_fisher_sums(output)
    one, one_info = load_fisher_sums(cache_file)
    assert two_info == one_info
    assert_fisher_close(two, one, rtol=1e-6)
