"""Weights sharded by FSDP2 (`fully_shard`), two processes on CPU (gloo), against one unsharded process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_deepclean.errors import DeepCleanError
from hf_deepclean.sharding import row_block, shard_model


@pytest.fixture(scope="module")
def fisher_blocks(tmp_path_factory):
    """Each rank's blocks of the Fisher sums of a tiny BERT (empirical) and a tiny GPT-2 with tied embeddings (true
    Fisher, sampled token labels), and the same rows of the unsharded sums."""
    from conftest import run_torchrun

    output = tmp_path_factory.mktemp("fsdp") / "fisher"
    log = run_torchrun([str(Path(__file__).parent / "fsdp_worker.py"), str(output)])
    files = [Path(f"{output}.rank{rank}.safetensors") for rank in range(2)]
    assert all(f.exists() for f in files), log[-3000:]
    return [load_file(f) for f in files]


def test_sharded_fisher_blocks_equal_the_unsharded_sums(fisher_blocks):
    for tensors in fisher_blocks:
        blocks = {k: v for k, v in tensors.items() if ".block." in k}
        assert len(blocks) == 57  # every parameter of both models
        for key, block in blocks.items():
            whole = tensors[key.replace(".block.", ".whole.")]
            assert block.shape == whole.shape, key
            torch.testing.assert_close(block, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()) + 1e-30)
    # the blocks split the rows by torch.chunk: 11 embedding rows of the GPT-2 as 6 and 5, covering each row once
    assert fisher_blocks[0]["gpt2.block.transformer.wte.weight"].shape[0] == 6
    assert fisher_blocks[1]["gpt2.block.transformer.wte.weight"].shape[0] == 5
    # and the sums are not trivially zero
    assert float(fisher_blocks[1]["gpt2.block.transformer.wte.weight"].sum()) > 0


def _brute_top_k(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest positive elements, ties by index in the concatenation: a sort, for the check."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    order = sorted(range(len(flat)), key=lambda i: (-float(flat[i]), i))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[[i for i in order[:k] if flat[i] > 0]] = True
    return [part.view(t.shape) for part, t in zip(chosen.split([t.numel() for t in tensors]), tensors, strict=True)]


def test_top_k_on_row_blocks_of_two_processes_equals_one_sort(fisher_blocks):
    from fsdp_worker import SELECTIONS, selection_tensors

    tensors = selection_tensors()
    for key, (groups, ks) in SELECTIONS.items():
        expected = []
        for group, k in enumerate(ks):
            members = [t for t, g in zip(tensors, groups, strict=True) if g == group]
            expected += _brute_top_k(members, k)
        for i in range(len(tensors)):
            if i == len(tensors) - 1:  # held whole by both processes: both masks are the whole mask
                assert torch.equal(fisher_blocks[0][f"select.{key}.{i}"], expected[i])
                assert torch.equal(fisher_blocks[1][f"select.{key}.{i}"], expected[i])
                continue
            mask = torch.cat([fisher_blocks[rank][f"select.{key}.{i}"] for rank in range(2)])
            assert torch.equal(mask, expected[i]), (key, i)
        # ties at the threshold are many: the selection takes exactly k of them (or every positive element)
        total = sum(int(fisher_blocks[0][f"select.{key}.{i}"].sum()) for i in range(len(tensors)))
        total += sum(int(fisher_blocks[1][f"select.{key}.{i}"].sum()) for i in range(len(tensors) - 1))
        assert total == sum(
            min(k, sum(int((t > 0).sum()) for t, g in zip(tensors, groups) if g == group))
            for group, k in enumerate(ks)
        )


def test_top_k_one_process_matches_a_sort_with_ties():
    from hf_deepclean.unlearning.top_k import Block, top_k_masks

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        tensors = [
            torch.randint(0, 5, (int(torch.randint(1, 6, (1,), generator=generator)), 3), generator=generator).float()
            * 10.0 ** int(torch.randint(-3, 3, (1,), generator=generator))
            for _ in range(3)
        ]
        k = int(torch.randint(0, sum(t.numel() for t in tensors) + 3, (1,), generator=generator))
        masks = top_k_masks([Block(t) for t in tensors], [k])
        for mask, expected in zip(masks, _brute_top_k(tensors, k), strict=True):
            assert torch.equal(mask, expected)


def test_masked_repair_under_fsdp_equals_one_process(fisher_blocks):
    """The library's steps (Fisher, top 30%, zero reset, masked repair) on a tiny BERT sharded over two processes,
    per-process batch 2, against one unsharded process with batch 4: the same masks, unselected weights exactly
    the original, cleaned weights equal to float tolerance, written whole by the main process only."""
    from accelerate import Accelerator
    from fsdp_worker import clean_tiny_bert

    original, expected, masks = clean_tiny_bert(Accelerator(cpu=True), sharded=False, batch_size=4)
    main, other = fisher_blocks
    assert not any(k.startswith("cleaned.") for k in other)  # the whole weights are gathered on the main process
    cleaned = {k.removeprefix("cleaned."): v for k, v in main.items() if k.startswith("cleaned.")}
    assert set(cleaned) == set(expected)
    selected = 0
    for name, mask in masks.items():
        assert torch.equal(main[f"mask.{name}"], mask), name
        assert torch.equal(cleaned[name][~mask], original[name][~mask]), name
        selected += int(mask.sum())
    assert selected > 0 and sum(int((cleaned[n] != original[n]).sum()) for n in masks) > 0.9 * selected
    for name, value in expected.items():
        torch.testing.assert_close(cleaned[name], value, rtol=1e-5, atol=1e-6)


def test_whole_tensors_are_one_block():
    weight = torch.zeros(5, 3)
    assert row_block(weight) == (0, 5)


def test_shard_model_refuses_a_model_without_the_named_blocks():
    with pytest.raises(DeepCleanError, match="no module of Linear has a class in"):
        shard_model(torch.nn.Linear(2, 2), wrap=("BertLayer",))


@pytest.mark.parametrize(
    "rule",
    [
        {"gamma": 3.0, "reset_fraction": None},
        {"gamma": 0.5, "reset_fraction": None, "max_reset_fraction": 0.1},
        {"gamma": None, "reset_fraction": 0.3},
        {"gamma": None, "reset_fraction": 0.3, "selection_scope": "per_parameter"},
        {"gamma": None, "reset_fraction": 0.4, "selection_scope": "per_parameter", "max_reset_fraction": 0.2},
    ],
)
def test_selection_rules_match_a_sort(rule):
    """The library's selection rules (on one process, whole tensors) against sorts of the ratios: gamma, a global or
    per-tensor share, and the cap, with some ratios at zero."""
    from hf_deepclean.unlearning.selection import select_weights_to_reset

    generator = torch.Generator().manual_seed(4)
    shapes = {"a": (4, 5), "b": (7,), "c": (3, 2, 2)}
    ratios = {n: torch.rand(s, generator=generator) ** 3 * 10 for n, s in shapes.items()}
    ratios["b"][:3] = 0
    names = list(shapes)
    total = sum(r.numel() for r in ratios.values())
    cap = round(rule.get("max_reset_fraction", 1.0) * total)
    if rule["gamma"] is not None:
        expected = [(ratios[n] > rule["gamma"]) for n in names]
        if sum(int(m.sum()) for m in expected) > cap:
            expected = _brute_top_k([ratios[n] for n in names], cap)
    elif rule.get("selection_scope") == "per_parameter":
        expected = [_brute_top_k([ratios[n]], round(rule["reset_fraction"] * ratios[n].numel()))[0] for n in names]
        if sum(int(m.sum()) for m in expected) > cap:
            expected = _brute_top_k([torch.where(m, ratios[n], 0) for m, n in zip(expected, names)], cap)
    else:
        expected = _brute_top_k([ratios[n] for n in names], min(round(rule["reset_fraction"] * total), cap))
    got = select_weights_to_reset(ratios, **rule)
    for name, mask in zip(names, expected, strict=True):
        assert torch.equal(got[name], mask), name
    assert sum(int(m.sum()) for m in got.values()) > 0


# --------------------------------------------------------------------------------------------------------------
# `hf-deepclean unlearn` under FSDP: `accelerate launch --config_file fsdp.yaml scripts/unlearn.py`, as users launch it
# --------------------------------------------------------------------------------------------------------------

FSDP_CONFIG = Path(__file__).parent.parent / "docs" / "examples" / "fsdp.yaml"


def _unlearn_arguments(model_dir, csv_dir, output_dir, batch_size: int) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir),
        "--dataset_name", "csv",
        "--data_files", f"train={csv_dir / 'train.csv'}", f"test={csv_dir / 'test.csv'}",
        "--forget", "random:0.2",
        "--repair_epochs", "2",
        "--early_stopping", "false",
        "--per_device_batch_size", str(batch_size),
        "--output_dir", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_and_one_process(text_model_dir, text_csv_files, tmp_path_factory):
    import os
    import subprocess
    import sys

    from hf_deepclean.cli import main

    work = tmp_path_factory.mktemp("fsdp-unlearn")
    script = Path(__file__).parent.parent / "scripts" / "unlearn.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), str(script),
         *_unlearn_arguments(text_model_dir, text_csv_files, work / "fsdp", batch_size=4)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    status = main(["unlearn", *_unlearn_arguments(text_model_dir, text_csv_files, work / "one", batch_size=8)])
    assert status == 0
    return work, launch


def test_unlearn_under_fsdp_writes_the_one_process_checkpoint(fsdp_and_one_process, text_model_dir):
    from transformers import AutoModelForSequenceClassification

    from hf_deepclean.hub.push import read_reports

    work, launch = fsdp_and_one_process
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    config, results = read_reports(work / "fsdp")
    _, one_results = read_reports(work / "one")
    assert (config.num_processes, config.sharding) == (2, "fsdp2")
    # the same elements selected (the fingerprint of the gathered masks), the same counts
    assert results.reset.selection_sha256 == one_results.reset.selection_sha256
    assert results.reset.statistics.total == one_results.reset.statistics.total
    assert results.fisher.forget_samples == 12 and results.fisher.retain_samples == 48
    # a whole checkpoint that from_pretrained loads without FSDP
    original = load_file(text_model_dir / "model.safetensors")
    fsdp = load_file(work / "fsdp" / "model.safetensors")
    one = load_file(work / "one" / "model.safetensors")
    assert set(fsdp) == set(one)
    AutoModelForSequenceClassification.from_pretrained(work / "fsdp")
    moved = 0
    for name, value in one.items():
        kept = value == original[name]  # unselected (and unchanged) elements of the one-process run
        assert torch.equal(fsdp[name][kept], original[name][kept]), name
        moved += int((~kept).sum())
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6)
    assert moved > 0


def test_the_card_says_the_weights_were_sharded(fsdp_and_one_process):
    work, _ = fsdp_and_one_process
    assert "| `sharding` | `fsdp2` |" in (work / "fsdp" / "README.md").read_text()
    assert "`sharding`" not in (work / "one" / "README.md").read_text()


@pytest.mark.gpu
def test_unlearn_under_fsdp_on_one_gpu_writes_the_plain_checkpoint(text_model_dir, text_csv_files, tmp_path):
    """`scripts/gpu_checks.sh`: Accelerate's own FSDP set-up on a CUDA device (one process), against a plain run."""
    import os
    import subprocess
    import sys

    assert torch.cuda.is_available()
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.read_text().replace("num_processes: 2", "num_processes: 1"))
    script = Path(__file__).parent.parent / "scripts" / "unlearn.py"
    runs = {}
    for name, launcher in (
        ("fsdp", [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script)]),
        ("plain", [sys.executable, str(script)]),
    ):
        arguments = _unlearn_arguments(text_model_dir, text_csv_files, tmp_path / name, batch_size=8)
        runs[name] = subprocess.run([*launcher, *arguments], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                                    capture_output=True, text=True, timeout=600)  # fmt: skip
        assert runs[name].returncode == 0, (runs[name].stdout + runs[name].stderr)[-4000:]
    from hf_deepclean.hub.push import read_reports

    fsdp_config, fsdp_results = read_reports(tmp_path / "fsdp")
    _, plain_results = read_reports(tmp_path / "plain")
    assert fsdp_config.sharding == "fsdp2"
    assert fsdp_results.reset.selection_sha256 == plain_results.reset.selection_sha256
    fsdp, plain = (
        load_file(tmp_path / "fsdp" / "model.safetensors"),
        load_file(tmp_path / "plain" / "model.safetensors"),
    )
    for name, value in plain.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-5)


def test_fisher_cache_is_refused_under_fsdp_and_nothing_is_written(text_model_dir, text_csv_files, tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "unlearn.py"
    cache = tmp_path / "sums.safetensors"
    cache.write_bytes(b"")  # never read: the refusal comes first
    arguments = _unlearn_arguments(text_model_dir, text_csv_files, tmp_path / "out", batch_size=4)
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), str(script),
         *arguments, "--fisher_cache", str(cache)],
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert launch.returncode != 0
    assert "--fisher_cache: not available under FSDP" in launch.stdout + launch.stderr
    assert not (tmp_path / "out").exists()
