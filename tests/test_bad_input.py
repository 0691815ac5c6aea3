"""Every bad input of issue 8, item 1, against the real CLI: one line on stderr that names the argument, the value
and what is accepted; exit status 2 for a usage error, 1 for a run that failed; no traceback unless `--debug`; and
nothing left behind (no output folder, no temporary sibling, an existing folder unchanged).

The table `BAD_INPUTS` is the source of the table in docs/errors.md: keep them in step.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_bert, make_reviews, tree_digest
from datasets import Dataset
from safetensors.torch import load_file, save_file

from hf_deepclean.cli import main
from hf_deepclean.errors import DeepCleanError


class Inputs:
    """A run's inputs: the tiny text model and CSV files, copies of them spoilt on purpose, and the output folder."""

    def __init__(self, root: Path, model_dir: Path, csv_dir: Path):
        self.root = root / "inputs"
        self.root.mkdir()
        self.outputs = root / "outputs"  # the output folder's parent: nothing may appear here
        self.outputs.mkdir()
        self.output_dir = self.outputs / "cleaned"
        self.model_dir = model_dir
        self.csv_dir = csv_dir

    def args(self, *, train: str | None = None, model: str | None = None, forget: str = "class:pos") -> list[str]:
        train = train or str(self.csv_dir / "train.csv")
        return [
            "unlearn",
            "--model_name_or_path", model or str(self.model_dir),
            "--dataset_name", "csv",
            "--data_files", f"train={train}", f"test={self.csv_dir / 'test.csv'}",
            "--forget", forget,
            "--output_dir", str(self.output_dir),
            "--repair_epochs", "0",
        ]  # fmt: skip

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def csv(self, name: str, rows: list[dict]) -> str:
        path = self.root / name
        Dataset.from_list(rows).to_csv(path, index=False)
        return str(path)

    def model_copy(self, name: str) -> Path:
        path = self.root / name
        shutil.copytree(self.model_dir, path)
        return path


def _with(args: list[str], **flags: str) -> list[str]:
    """`args` with `--NAME VALUE` replaced (or appended)."""
    args = list(args)
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _truncated_weights(inputs: Inputs) -> list[str]:
    model = inputs.model_copy("truncated-model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return inputs.args(model=str(model))


def _corrupted_weights(inputs: Inputs) -> list[str]:
    model = inputs.model_copy("corrupted-model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00not a json header at all\xff\xfe\x00\x00\x00\x00"[:32]
    weights.write_bytes(bytes(data))
    return inputs.args(model=str(model))


def _truncated_fisher_cache(inputs: Inputs) -> list[str]:
    path = inputs.root / "cache.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    return [*inputs.args(), "--fisher_cache", str(path)]


def _prompt_tuning_adapter(inputs: Inputs) -> list[str]:
    """A prompt-tuning adapter: its virtual-token embeddings live outside the model's layers, so `--scope adapter`
    would have no trainable parameter to work on."""
    from peft import PromptTuningConfig, get_peft_model

    model, _ = build_tiny_bert()
    adapter = inputs.root / "prompt-adapter"
    config = PromptTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION")
    get_peft_model(model, config).save_pretrained(adapter)
    return [*inputs.args(), "--adapter_name_or_path", str(adapter), "--scope", "adapter"]


def _infinite_fisher(inputs: Inputs) -> list[str]:
    """Finite weights and outputs whose gradients square to inf: the [CLS] features are 1e25 (the last LayerNorm's
    scale) and the pooler's weights 1e-30, so the logits stay small while the pooler's Fisher overflows float32."""
    model = inputs.model_copy("overflowing-model")
    weights = load_file(model / "model.safetensors")
    weights["bert.encoder.layer.1.output.LayerNorm.weight"].fill_(1e25)
    weights["bert.pooler.dense.weight"].mul_(1e-30)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return inputs.args(model=str(model))


def _labels(rows: list[dict], mapping: Callable[[int, int], object]) -> list[dict]:
    return [{**row, "label": mapping(i, row["label"])} for i, row in enumerate(rows)]


@dataclass(frozen=True)
class BadInput:
    """A row of the table: what is wrong, how to build the command, and what the error line must say.

    `says` are fragments of the message: the argument first, then the value received and what is accepted.
    """

    id: str
    input: str
    build: Callable[[Inputs], list[str]]
    says: tuple[str, ...]
    exit_code: int = 2


BAD_INPUTS = [
    BadInput(
        "model-folder-missing",
        "model folder that does not exist",
        lambda i: i.args(model=str(i.root / "no-such-model")),
        (
            "--model_name_or_path: got '",
            "no-such-model', which is no folder; expected a local folder with config.json",
        ),
    ),
    BadInput(
        "model-repo-missing-offline",
        "Hub repo id that does not exist (offline)",
        lambda i: i.args(model="no-such-org/no-such-model"),
        ("--model_name_or_path: could not load 'no-such-org/no-such-model'", "expected a Hub model id or a local"),
    ),
    BadInput(
        "label-ids-out-of-range",
        "label ids the model does not have",
        lambda i: i.args(train=i.csv("train.csv", _labels(make_reviews(60, 1), lambda n, y: y + 2 * (n % 2)))),
        ("--label_column: split 'train' holds labels [2, 3] in 'label'", "expected ids 0..1"),
    ),
    BadInput(
        "label-names-unknown",
        "label names the model does not have",
        lambda i: i.args(
            train=i.csv("train.csv", _labels(make_reviews(60, 1), lambda n, y: ["bad", "good"][y])), forget="random:5"
        ),
        ("--label_column: split 'train' holds labels ['bad', 'good'] in 'label'", "expected the model's labels"),
    ),
    BadInput(
        "forget-indices-out-of-range",
        "row indices beyond the split",
        lambda i: i.args(forget="indices:" + i.file("rows.json", "[0, 5, 60, 1000]")),
        ("--forget: 'indices:", "lists 2 row indices beyond the 60 rows of split 'train'", "accepted forms"),
    ),
    BadInput(
        "forget-indices-not-integers",
        "row indices that are not integers",
        lambda i: i.args(forget="indices:" + i.file("rows.txt", "3\n-1\n")),
        ("--forget: 'indices:", "lists a value that is not a non-negative integer row index", "accepted forms"),
    ),
    BadInput(
        "forget-ids-unknown",
        "ids that match no row",
        lambda i: i.args(forget="ids:id:" + i.file("ids.txt", "r1-3\nnobody\n")),
        ("--forget: 'ids:id:<redacted>' lists 1 ids that match no row of 'id'", "accepted forms"),
    ),
    BadInput(
        "no-trainable-parameters-in-scope",
        "no trainable parameters in scope",
        _prompt_tuning_adapter,
        ("--adapter_name_or_path: got '", "a PROMPT_TUNING adapter", "no trainable parameters in scope", "LoRA"),
    ),
    BadInput(
        "reset-base-without-base-model",
        "`--reset base` without `--base_model_name_or_path`",
        lambda i: _with(i.args(), reset="base"),
        ("--reset: got 'base', which needs --base_model_name_or_path", "or use --reset init."),
    ),
    BadInput(
        "reset-base-with-adapter-scope",
        "`--reset base` with `--scope adapter`",
        lambda i: _with(i.args(), reset="base", scope="adapter", base_model_name_or_path=str(i.model_dir)),
        ("--reset: got 'base' with --scope adapter", "expected --reset init."),
    ),
    BadInput(
        "reset-base-with-adapter",
        "`--reset base` with `--adapter_name_or_path`",
        lambda i: _with(
            i.args(),
            reset="base",
            base_model_name_or_path=str(i.model_dir),
            adapter_name_or_path=str(i.root / "adapter"),
        ),
        ("--reset: got 'base' with --adapter_name_or_path", "expected --reset init."),
    ),
    BadInput(
        "base-model-folder-missing",
        "base model folder that does not exist",
        lambda i: _with(i.args(), reset="base", base_model_name_or_path=str(i.root / "no-such-base")),
        (
            "--base_model_name_or_path: got '",
            "no-such-base', which is no folder; expected a local folder with config.json",
        ),
    ),
    BadInput(
        "dataset-empty",
        "empty dataset",
        lambda i: i.args(train=i.file("train.csv", "id,text,label\n")),
        ("--data_files: split 'train' (", "train.csv) has no rows; expected at least one row."),
    ),
    BadInput(
        "data-file-empty",
        "empty data file",
        lambda i: i.args(train=i.file("train.csv", "")),
        ("--data_files: could not load train=", "as csv (EmptyDataError: No columns to parse from file)", "UTF-8"),
    ),
    BadInput(
        "data-file-not-csv",
        "data file that is not valid CSV",
        lambda i: i.args(train=i.file("train.csv", 'id,text,label\n1,"a,0\n2,b,1,7,8\n')),
        ("--data_files: could not load train=", "as csv (ParserError: Error tokenizing data", "expected valid csv"),
    ),
    BadInput(
        "data-file-not-utf8",
        "data file that is not UTF-8",
        lambda i: i.args(train=i.file("train.csv", "id,text,label\n1,caf\xe9 cr\xe8me,0\n".encode("latin-1"))),
        ("--data_files: could not load train=", "as csv (UnicodeDecodeError: ", "(text in UTF-8)"),
    ),
    BadInput(
        "data-file-not-json",
        "data file that is not valid JSON",
        lambda i: _with(
            i.args(train=i.file("train.jsonl", '{"id": 1, "text": "a", "label": 0}\n{"id": 2, "te')),
            dataset_name="json",
        ),
        (
            "--data_files: could not load train=",
            "train.jsonl",
            "as json (ArrowInvalid: JSON parse error",
            "json files",
        ),
    ),
    BadInput(
        "weights-truncated",
        "truncated safetensors weights",
        _truncated_weights,
        ("--model_name_or_path: could not load", "truncated-model", "expected safetensors weights"),
    ),
    BadInput(
        "weights-corrupted",
        "corrupted safetensors weights",
        _corrupted_weights,
        ("--model_name_or_path: could not load", "corrupted-model", "expected safetensors weights"),
    ),
    BadInput(
        "fisher-cache-truncated",
        "truncated safetensors Fisher cache",
        _truncated_fisher_cache,
        ("--fisher_cache: '", "cache.safetensors' is not a readable safetensors file"),
    ),
    BadInput(
        "output-dir-not-empty",
        "existing non-empty `--output_dir`",
        lambda i: i.args(),
        ("--output_dir: '", "cleaned' exists and is not empty; pass --overwrite_output_dir to replace it."),
    ),
    BadInput(
        "output-dir-under-a-file",
        "`--output_dir` that cannot be written",
        lambda i: _with(i.args(), output_dir=str(Path(i.file("notes.txt", "a file")) / "cleaned")),
        ("--output_dir: cannot write '", "notes.txt' is a file; expected a folder that can be created and written."),
    ),
    BadInput(
        "fisher-not-finite",
        "Fisher diagonal that is not finite",
        _infinite_fisher,
        (
            "Fisher forget: the Fisher diagonal of 'bert.pooler.dense.weight'",
            "is not finite; expected finite gradients from the model of --model_name_or_path",
        ),
        exit_code=1,
    ),
]


# Usage errors of one flag: (flag, value given, the message after `--flag: `).
FLAG_ERRORS = [
    ("train_split", "training", "got 'training'; the dataset has splits ['test', 'train']."),
    ("eval_split", "validation", "got 'validation'; the dataset has splits ['test', 'train']."),
    ("text_column", "review", "got 'review'; the dataset has columns ['id', 'text', 'label']."),
    ("label_column", "stars", "got 'stars'; the dataset has columns ['id', 'text', 'label']."),
    ("gamma", "0", "got 0.0; expected a finite number > 0."),
    ("gamma", "-3", "got -3.0; expected a finite number > 0."),
    ("gamma", "nan", "got nan; expected a finite number > 0."),
    ("gamma", "ten", "got 'ten'; expected a number."),
    ("reset_fraction", "0", "got 0.0; expected a number in (0, 1]."),
    ("reset_fraction", "1.5", "got 1.5; expected a number in (0, 1]."),
    ("max_reset_fraction", "-0.1", "got -0.1; expected a number in (0, 1]."),
    ("max_accuracy_drop", "0", "got 0.0; expected a number in (0, 1]."),
    ("max_perplexity_rise", "0", "got 0.0; expected a finite number > 0."),
    ("max_perplexity_rise", "inf", "got inf; expected a finite number > 0."),
    (
        "reference_model",
        "./no-such-reference",
        "got './no-such-reference', which is no folder; expected a local folder with config.json or a Hub model id "
        "(ORG/NAME).",
    ),
    (
        "scope",
        "adapter",
        "got 'adapter', but the model has no trainable peft adapter weights; pass --adapter_name_or_path",
    ),
]
# Forget specifications refused without reading a file: (spec, the message after `--forget: `, before the forms).
FORGET_ERRORS = [
    ("rows 1 to 5", "'rows 1 to 5' has no 'KIND:' prefix"),
    ("rows:1-5", "'rows:1-5' has unknown kind 'rows'"),
    ("where:id==nobody", "'where:id == <redacted>' selects no rows of split 'train'"),
    ("where:id!=nobody", "'where:id != <redacted>' selects all 60 rows of split 'train'; nothing would be retained"),
    ("random:60", "'random:60' selects 60 of 60 rows, i.e. all of them"),
    ("random:1.5", "'random:1.5' needs a fraction in (0, 1) or a positive row count"),
    ("class:neutral", "'class:neutral' names an unknown label (labels in 'label': 0, 1)"),
    ("where:user==42", "'where:user == <redacted>' names column 'user', which is not in ['id', 'text', 'label']"),
    ("split:leaked", "'split:leaked' names a split that does not exist (splits: ['test', 'train'])"),
]
FORGET_FORMS = "; accepted forms: split:NAME, indices:FILE, ids:COLUMN:FILE, where:COLUMN==VALUE"


def _with_flag(flag: str, value: str, inputs: Inputs) -> list[str]:
    return _with(inputs.args(), **{flag: value})


def _with_forget(spec: str, inputs: Inputs) -> list[str]:
    return inputs.args(forget=spec)


BAD_INPUTS += [
    BadInput(f"{flag}={value}", f"`--{flag} {value}`", partial(_with_flag, flag, value), (f"--{flag}: {message}",))
    for flag, value, message in FLAG_ERRORS
]
BAD_INPUTS += [
    BadInput(
        f"forget={spec}", f"`--forget {spec}`", partial(_with_forget, spec), (f"--forget: {message}{FORGET_FORMS}",)
    )
    for spec, message in FORGET_ERRORS
]


@pytest.fixture
def inputs(tmp_path, text_model_dir, text_csv_files):
    return Inputs(tmp_path, text_model_dir, text_csv_files)


def _prepare(case: BadInput, inputs: Inputs) -> tuple[list[str], dict[str, str] | None]:
    """The command, and a digest of the output folder when the case needs one to exist already."""
    args = case.build(inputs)
    if case.id == "output-dir-not-empty":
        inputs.output_dir.mkdir()
        (inputs.output_dir / "model.safetensors").write_bytes(b"an earlier run")
        return args, tree_digest(inputs.output_dir)
    return args, None


# a tqdm progress bar (model loading, data generation): the only output allowed before the error line
PROGRESS_BAR = re.compile(r"^[^\r]*\[\d\d:\d\d(<[\d:?]+)?, [^\]]*\]$")


def _error_line(stderr: str) -> str:
    """The single line of the error, checking that all else on stderr is progress bars and there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert all(PROGRESS_BAR.match(line) for line in lines[:-1]), stderr
    return lines[-1]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_is_refused_with_one_line(case, inputs, capsys):
    args, existing = _prepare(case, inputs)
    capsys.readouterr()  # what building the inputs printed
    code = main(args)
    captured = capsys.readouterr()
    assert code == case.exit_code, captured.err
    error = _error_line(captured.err)
    assert error.startswith("hf-deepclean unlearn: error: "), error
    message = error.removeprefix("hf-deepclean unlearn: error: ")
    assert message.startswith(case.says[0]), message
    for fragment in case.says:
        assert fragment in message, message
    assert captured.out == ""
    # nothing left behind: no output folder (or the old one as it was), no temporary sibling
    if existing is None:
        assert list(inputs.outputs.iterdir()) == []
    else:
        assert [p.name for p in inputs.outputs.iterdir()] == [inputs.output_dir.name]
        assert tree_digest(inputs.output_dir) == existing


@pytest.mark.parametrize("case_id", ["forget=where:id==nobody", "weights-truncated", "fisher-not-finite"])
def test_debug_shows_the_traceback(case_id, inputs, capsys):
    """`--debug` lets the error propagate, so the interpreter prints its traceback (and exits 1)."""
    case = next(case for case in BAD_INPUTS if case.id == case_id)
    args, _ = _prepare(case, inputs)
    with pytest.raises(DeepCleanError, match=case.says[0].split(":")[0]) as raised:
        main([*args, "--debug"])
    assert raised.value.exit_code == case.exit_code
    assert "error:" not in capsys.readouterr().err
    assert list(inputs.outputs.iterdir()) == []


def test_repo_id_missing_on_the_hub_is_one_line(hub_server, inputs):
    """Online: the stand-in Hub answers 404 for a repository that does not exist."""
    import subprocess

    args = inputs.args(model="no-such-org/no-such-model")
    cli = [sys.executable, "-m", "hf_deepclean.cli"]
    result = subprocess.run([*cli, *args], capture_output=True, text=True, env=hub_server.env(), timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "hf-deepclean unlearn: error: --model_name_or_path: could not load 'no-such-org/no-such-model'"
    )
    assert "is not a local folder and is not a valid model identifier" in lines[0]
    assert lines[0].endswith("; expected a Hub model id or a local folder with config.json.")
    assert list(inputs.outputs.iterdir()) == []
    # the client did ask the server (and got a 404), rather than failing on being offline
    assert any("no-such-org/no-such-model" in line and " 404" in line for line in hub_server.requests())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder, whatever its permission bits")
def test_output_dir_without_write_permission(inputs, capsys):
    inputs.outputs.chmod(0o555)
    try:
        assert main(inputs.args()) == 2
    finally:
        inputs.outputs.chmod(0o755)
    error = _error_line(capsys.readouterr().err)
    assert error.startswith("hf-deepclean unlearn: error: --output_dir: cannot write '"), error
    assert "Permission denied under" in error and error.endswith("expected a folder that can be created and written.")
    assert list(inputs.outputs.iterdir()) == []


def test_empty_scope_is_refused(text_model_dir):
    """With every parameter frozen (possible from Python, not from the command line), scope `all` is empty."""
    from transformers import AutoModelForSequenceClassification

    from hf_deepclean.modeling import get_parameters_in_scope

    model = AutoModelForSequenceClassification.from_pretrained(text_model_dir).requires_grad_(False)
    with pytest.raises(DeepCleanError, match=r"^--scope: the model has no trainable parameters in scope 'all'\.$"):
        get_parameters_in_scope(model, "all")


def test_failure_to_write_the_output_is_a_run_failure(inputs, capsys, monkeypatch):
    """A disk that fills up while the folder is written: exit 1, one line, no partial or temporary folder."""
    import errno

    from transformers import PreTrainedModel

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(inputs.args()) == 1
    error = _error_line(capsys.readouterr().err)
    assert error == (
        f"hf-deepclean unlearn: error: --output_dir: could not write {str(inputs.output_dir)!r} (No space left on "
        "device); nothing was written, expected a folder with room for the model."
    )
    assert list(inputs.outputs.iterdir()) == []
