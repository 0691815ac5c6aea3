"""Parsers never crash on arbitrary input, and a run is bit-for-bit reproducible (issue 8, items 4 and 6)."""

from __future__ import annotations

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hf_deepclean.config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments
from hf_deepclean.data.forget import parse_forget_spec, resolve_forget_set
from hf_deepclean.errors import DeepCleanError


SPEC_PREFIXES = ["split:", "indices:", "ids:", "where:", "random:", "class:", ""]
spec_text = st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(SPEC_PREFIXES), st.text(max_size=40))
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(spec_text)
def test_forget_spec_parser_parses_or_refuses(spec):
    try:
        parsed = parse_forget_spec(spec)
    except DeepCleanError as error:
        assert "\n" not in str(error).strip()
        return
    assert parsed.kind in {"split", "indices", "ids", "where", "random", "class"}


@pytest.fixture(scope="module")
def splits():
    features = Features({"id": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    rows = [{"id": f"u{i}", "label": i % 2} for i in range(12)]
    return DatasetDict({"train": Dataset.from_list(rows, features), "test": Dataset.from_list(rows[:4], features)})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["where:", "random:", "class:", "split:"]).flatmap(lambda p: st.text(max_size=20).map(p.__add__))
)
def test_forget_spec_resolution_selects_or_refuses(splits, spec):
    """Specs that need no file, resolved against real splits: a proper, non-empty subset of rows, or an error."""
    try:
        selection = resolve_forget_set(
            spec, splits, train_split="train", label_column="label", label2id={"neg": 0, "pos": 1}, seed=0
        )
    except DeepCleanError:
        return
    assert selection.num_rows > 0
    if not selection.is_separate_split:
        assert selection.num_rows < 12 and set(selection.indices) <= set(range(12))


@settings(max_examples=300, deadline=None)
@given(
    fisher_type=values | st.sampled_from(["empirical", "true"]),
    scope=values | st.sampled_from(["all", "adapter"]),
    gamma=values,
    reset_fraction=values,
    max_reset_fraction=values,
    reset=values | st.sampled_from(["init", "zero"]),
    repair_epochs=values,
    learning_rate=values,
    fisher_chunk_memory_mb=values,
)
def test_method_config_accepts_or_refuses(**kwargs):
    try:
        DeepCleanConfig(**kwargs)
    except DeepCleanError as error:
        assert str(error).startswith("--"), error  # names the argument


@settings(max_examples=200, deadline=None)
@given(name=values, dataset=values, forget=values, output=values, seed=values, max_length=values)
def test_argument_classes_accept_or_refuse(name, dataset, forget, output, seed, max_length):
    for build in (
        lambda: ModelArguments(name),
        lambda: DataArguments(dataset, forget=forget, max_length=max_length),
        lambda: OutputArguments(output, seed=seed),
    ):
        try:
            build()
        except DeepCleanError as error:
            assert str(error).startswith("--"), error


def test_same_inputs_and_seed_give_bit_identical_weights(tmp_path, text_model_dir, text_csv_files):
    from hf_deepclean.cli import main

    outputs = []
    for run in range(2):
        output = tmp_path / f"run{run}"
        args = ["unlearn", "--model_name_or_path", str(text_model_dir), "--dataset_name", "csv", "--data_files"]
        args += [f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}"]
        args += ["--forget", "random:0.2", "--output_dir", str(output), "--repair_epochs", "1", "--seed", "7"]
        assert main(args) == 0
        outputs.append(load_file(output / "model.safetensors"))
    first, second = outputs
    assert set(first) == set(second)
    assert all(torch.equal(first[name], second[name]) for name in first)
    original = load_file(text_model_dir / "model.safetensors")
    assert any(not torch.equal(first[name], original[name]) for name in first)  # the run did change weights


def test_pickle_weights_load_only_when_allowed(tmp_path, text_model_dir, text_csv_files, capsys):
    """A checkpoint with only `pytorch_model.bin` is refused (one line, nothing written) unless
    `--allow_pickle_weights`; then it loads and unlearning runs."""
    import shutil

    from hf_deepclean.cli import main

    pickled = tmp_path / "pickled"
    shutil.copytree(text_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = ["unlearn", "--model_name_or_path", str(pickled), "--dataset_name", "csv", "--data_files"]
    args += [f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}"]
    args += ["--forget", "class:pos", "--repair_epochs", "1"]
    assert main([*args, "--output_dir", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("hf-deepclean unlearn: error: --model_name_or_path") and "--allow_pickle_weights" in error
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--output_dir", str(tmp_path / "allowed"), "--allow_pickle_weights"]) == 0
    assert (tmp_path / "allowed" / "model.safetensors").exists()  # written back as safetensors


@pytest.mark.parametrize(
    ("signum", "after", "code"),
    [("SIGINT", "Forget set:", 130), ("SIGTERM", "Reset ", 143)],
    ids=["sigint-before-fisher", "sigterm-in-repair"],
)
def test_interrupted_run_leaves_nothing_behind(tmp_path, text_model_dir, text_csv_files, signum, after, code):
    """A real `hf-deepclean unlearn` is sent the signal once its log shows the stage; it exits 128 + signal number
    with a one-line message, and neither the output folder nor a temporary sibling of it exists."""
    import os
    import signal
    import subprocess
    import sys

    output = tmp_path / "out"
    args = [sys.executable, "-m", "hf_deepclean.cli", "unlearn", "--model_name_or_path", str(text_model_dir)]
    args += ["--dataset_name", "csv", "--data_files", f"train={text_csv_files / 'train.csv'}"]
    args += [f"test={text_csv_files / 'test.csv'}", "--forget", "class:pos", "--output_dir", str(output)]
    args += ["--repair_epochs", "400", "--per_device_batch_size", "4"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as process:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if after in line:
                process.send_signal(getattr(signal, signum))
                break
        rest = process.stderr.read()
        assert process.wait(timeout=300) == code, "".join(seen) + rest
    assert rest.strip().splitlines()[-1] == f"hf-deepclean unlearn: interrupted by {signum}; nothing was written."
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder either


# Runs `hf-deepclean unlearn` several times in one process (one interpreter start-up for all), each time held at a
# point of the saving stage until the test sends a signal: "card" after the model card was written into the
# temporary folder, "swap" after an existing output folder was moved aside and before the new one is moved in.
SAVE_INTERRUPT_DRIVER = """
import json, os, sys, time
from pathlib import Path

import hf_deepclean.pipeline.unlearn as unlearner
from hf_deepclean.cli import main


def hold():
    print("held", flush=True)
    time.sleep(300)  # the signal arrives here


write_card, replace = unlearner.save_model_card, os.replace


def card_then_hold(folder, *args, **kwargs):
    card = write_card(folder, *args, **kwargs)
    hold()
    return card


def replace_then_hold(source, destination):
    replace(source, destination)
    if Path(destination).name == "previous":  # atomic_output_dir moved the existing folder aside
        hold()


for hold_at, argv in json.loads(sys.argv[1]):
    unlearner.save_model_card, os.replace = write_card, replace
    if hold_at == "card":
        unlearner.save_model_card = card_then_hold
    else:
        os.replace = replace_then_hold
    print(f"=== {hold_at}", file=sys.stderr, flush=True)
    print(f"exit {main(argv)}", flush=True)
"""


def test_interrupt_while_saving_keeps_the_old_folder_and_leaves_no_temporary_one(
    tmp_path, text_model_dir, text_csv_files
):
    """SIGINT/SIGTERM while the output folder is being written (`atomic_output_dir`): exit 130/143 with one line,
    no partial output folder and no temporary sibling; an existing folder being replaced (`--overwrite_output_dir`)
    is still there, unchanged, even when the signal comes after it was moved aside."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import tree_digest

    scenarios = [  # (hold at, signal, replace an existing folder)
        ("card", signal.SIGINT, False),
        ("card", signal.SIGTERM, True),
        ("swap", signal.SIGINT, True),
    ]
    runs, folders = [], []
    for number, (hold_at, _, existing) in enumerate(scenarios):
        parent = tmp_path / f"run{number}"  # the output folder's parent: temporary folders would appear here
        parent.mkdir()
        output = parent / "cleaned"
        args = ["unlearn", "--model_name_or_path", str(text_model_dir), "--dataset_name", "csv", "--data_files"]
        args += [f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}"]
        args += ["--forget", "random:5", "--repair_epochs", "0", "--output_dir", str(output)]
        if existing:
            output.mkdir()
            (output / "model.safetensors").write_bytes(b"the weights of an earlier run")
            (output / "README.md").write_text("an earlier card")
            args.append("--overwrite_output_dir")
        runs.append((hold_at, args))
        folders.append((parent, output, tree_digest(output) if existing else None))

    stderr_path = tmp_path / "stderr.txt"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SAVE_INTERRUPT_DRIVER, json.dumps(runs)]
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env) as process,
    ):
        try:
            codes = []
            for _, signum, _ in scenarios:
                line = process.stdout.readline()
                assert line == "held\n", line + stderr_path.read_text()[-3000:]
                process.send_signal(signum)
                codes.append(process.stdout.readline().strip())
            assert process.wait(timeout=60) == 0, stderr_path.read_text()[-3000:]
        finally:
            process.kill()

    outputs = stderr_path.read_text().split("=== ")[1:]
    for (hold_at, signum, _), code, output, (parent, folder, before) in zip(scenarios, codes, outputs, folders):
        assert code == f"exit {128 + signum}", output
        assert "Traceback" not in output, output
        lines = output.strip().splitlines()
        assert lines[-1] == f"hf-deepclean unlearn: interrupted by {signum.name}; nothing was written.", output
        assert sum("interrupted" in line for line in lines) == 1, output
        if before is None:
            assert list(parent.iterdir()) == []  # no partial output folder, no temporary one
        else:
            assert [p.name for p in parent.iterdir()] == [folder.name], hold_at  # no temporary sibling
            assert tree_digest(folder) == before  # the folder being replaced is intact
