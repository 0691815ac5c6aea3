"""Argument dataclass validation and the `unlearn` command line (flags, `--config` YAML, errors, help)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hf_deepclean.cli import main, parse_unlearn_args
from hf_deepclean.config import (
    ARGUMENT_CLASSES,
    DEFAULT_MAX_RETAIN_SAMPLES,
    DataArguments,
    DeepCleanConfig,
    ModelArguments,
    OutputArguments,
    arguments_to_dict,
)
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.pipeline.deepclean import UnlearningRows


REQUIRED = {
    ModelArguments: {"model_name_or_path": "tiny-bert"},
    DataArguments: {"dataset_name": "csv", "forget": "random:0.1"},
    DeepCleanConfig: {},
    OutputArguments: {"output_dir": "out"},
}
REQUIRED_FLAGS = ["--model_name_or_path", "m", "--dataset_name", "csv", "--forget", "class:1", "--output_dir", "o"]


# --------------------------------------------------------------------------------------------------------------
# __post_init__ validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ARGUMENT_CLASSES)
def test_defaults_with_required_values_are_valid(cls):
    args = cls(**REQUIRED[cls])
    for name, value in REQUIRED[cls].items():
        assert getattr(args, name) == value


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (DeepCleanConfig, "gamma", 0.0),
        (DeepCleanConfig, "gamma", -1.0),
        (DeepCleanConfig, "gamma", math.nan),
        (DeepCleanConfig, "gamma", math.inf),
        (DeepCleanConfig, "reset_fraction", 0.0),
        (DeepCleanConfig, "reset_fraction", 1.5),
        (DeepCleanConfig, "max_reset_fraction", 2),
        (DeepCleanConfig, "max_reset_fraction", 0),
        (DeepCleanConfig, "reset", "ones"),
        (DeepCleanConfig, "lr_scheduler_type", "reduce_lr_on_plateau"),
        (DeepCleanConfig, "fisher_type", "x"),
        (DeepCleanConfig, "scope", "lora"),
        (DeepCleanConfig, "eps", 0.0),
        (DeepCleanConfig, "learning_rate", 0),
        (DeepCleanConfig, "learning_rate", -1e-3),
        (DeepCleanConfig, "per_device_batch_size", 0),
        (DeepCleanConfig, "per_device_batch_size", 2.5),
        (DeepCleanConfig, "repair_epochs", -1.0),
        (DeepCleanConfig, "weight_decay", -0.1),
        (DeepCleanConfig, "max_grad_norm", -1.0),
        (DeepCleanConfig, "warmup_ratio", 1.0),
        (DeepCleanConfig, "warmup_ratio", -0.1),
        (ModelArguments, "model_name_or_path", ""),
        (ModelArguments, "model_name_or_path", "   "),
        (ModelArguments, "task", "token-classification"),
        (ModelArguments, "base_model_name_or_path", " "),
        (DataArguments, "dataset_name", ""),
        (DataArguments, "forget", ""),
        (DataArguments, "forget", " "),
        (DataArguments, "max_length", 0),
        (DataArguments, "max_retain_samples", -5),
        (DataArguments, "max_eval_samples", 1.5),
        (OutputArguments, "output_dir", ""),
        (OutputArguments, "seed", "7"),
        (OutputArguments, "seed", True),
        (OutputArguments, "reference_model", " "),
        (DeepCleanConfig, "early_stopping_perplexity_tolerance", -0.01),
        (DeepCleanConfig, "early_stopping_perplexity_tolerance", math.inf),
    ],
)
def test_bad_values_raise_naming_the_argument_and_the_value(cls, name, value):
    with pytest.raises(DeepCleanError) as error:
        cls(**{**REQUIRED[cls], name: value})
    message = str(error.value)
    assert message.startswith(f"--{name}: ")
    assert repr(value) in message
    assert "\n" not in message


def test_reset_base_is_refused_on_adapter_scope():
    with pytest.raises(
        DeepCleanError, match=r"^--reset: got 'base' with --scope adapter; .* expected --reset init\.$"
    ):
        DeepCleanConfig(reset="base", scope="adapter")
    assert DeepCleanConfig(reset="base").reset == "base"


def test_the_reset_share_left_unset_is_decided_per_model():
    from hf_deepclean.pipeline.deepclean import concrete_config

    def share(config, language_model):
        return concrete_config(config, base_known=False, language_model=language_model).reset_fraction

    assert DeepCleanConfig().reset_fraction is None
    assert DeepCleanConfig().selection_rule == "top a share decided per model of elements by ratio"
    assert (share(DeepCleanConfig(), False), share(DeepCleanConfig(), True)) == (0.5, 0.05)
    # a share or a threshold the user gives is kept, for every kind of model
    for language_model in (False, True):
        assert share(DeepCleanConfig(reset_fraction=0.2), language_model) == 0.2
        assert share(DeepCleanConfig(gamma=2.0), language_model) is None
        assert share(DeepCleanConfig.from_preset("paper"), language_model) is None
    assert DeepCleanConfig(gamma=2.0).selection_rule == "ratio > 2"
    assert DeepCleanConfig(reset_fraction=0.1).selection_rule == "top 0.1 of elements by ratio"


def test_boundary_values_are_accepted():
    config = DeepCleanConfig(reset_fraction=1.0, max_reset_fraction=1.0, repair_epochs=0, max_grad_norm=0.0)
    assert (config.reset_fraction, config.max_reset_fraction, config.repair_epochs) == (1.0, 1.0, 0)


def test_arguments_to_dict_flattens_every_field():
    arguments = [cls(**REQUIRED[cls]) for cls in ARGUMENT_CLASSES]
    flat = arguments_to_dict(*arguments)
    assert set(flat) == {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    assert flat["forget"] == "random:0.1"


# --------------------------------------------------------------------------------------------------------------
# parse_unlearn_args
# --------------------------------------------------------------------------------------------------------------


def test_parse_every_flag_into_the_four_dataclasses():
    argv = [
        *("--model_name_or_path", "org/model", "--revision", "v1", "--task", "text-classification"),
        "--trust_remote_code",
        *("--dataset_name", "csv", "--forget", "class:1", "--dataset_config_name", "cfg"),
        *("--dataset_revision", "r1", "--data_files", "train=a.csv", "test=b.csv"),
        *("--train_split", "fit", "--eval_split", "ev", "--text_column", "t", "--text_pair_column", "t2"),
        *("--image_column", "im", "--label_column", "lab", "--max_length", "12"),
        *("--max_retain_samples", "5", "--max_eval_samples", "6"),
        *("--fisher_type", "true", "--scope", "all", "--gamma", "2", "--reset_fraction", "0.3"),
        *("--max_reset_fraction", "0.4", "--eps", "1e-9", "--reset", "zero", "--repair_epochs", "0"),
        *("--learning_rate", "0.5", "--weight_decay", "0.1", "--warmup_ratio", "0.1"),
        *("--lr_scheduler_type", "cosine", "--max_grad_norm", "0", "--per_device_batch_size", "7"),
        *("--output_dir", "o", "--overwrite_output_dir", "--seed", "3", "--debug"),
        *("--early_stopping", "--early_stopping_perplexity_tolerance", "0.05"),
        *("--reference_model", "org/retrained", "--reference_revision", "v2"),
    ]
    model_args, data_args, method, output_args, debug = parse_unlearn_args(argv)
    assert model_args == ModelArguments("org/model", revision="v1", task="text-classification", trust_remote_code=True)
    assert data_args == DataArguments(
        dataset_name="csv",
        forget="class:1",
        dataset_config_name="cfg",
        dataset_revision="r1",
        data_files=["train=a.csv", "test=b.csv"],
        train_split="fit",
        eval_split="ev",
        text_column="t",
        text_pair_column="t2",
        image_column="im",
        label_column="lab",
        max_length=12,
        max_retain_samples=5,
        max_eval_samples=6,
    )
    assert method == DeepCleanConfig(
        fisher_type="true",
        scope="all",
        gamma=2.0,
        reset_fraction=0.3,
        max_reset_fraction=0.4,
        eps=1e-9,
        reset="zero",
        repair_epochs=0.0,
        learning_rate=0.5,
        weight_decay=0.1,
        warmup_ratio=0.1,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        per_device_batch_size=7,
        early_stopping=True,
        early_stopping_perplexity_tolerance=0.05,
    )
    assert output_args == OutputArguments(
        output_dir="o", overwrite_output_dir=True, seed=3, reference_model="org/retrained", reference_revision="v2"
    )
    assert debug is True


def test_retain_fisher_reads_a_bounded_sample_unless_told_to_read_every_row():
    """The retain Fisher pass reads at most DEFAULT_MAX_RETAIN_SAMPLES rows by default, in the CLI and in the library;
    `--max_retain_samples 0` reads every retain row."""
    assert DataArguments(dataset_name="csv", forget="class:1").max_retain_samples == DEFAULT_MAX_RETAIN_SAMPLES == 2048
    fields = {field.name: field.default for field in dataclasses.fields(UnlearningRows)}
    assert fields["max_retain_samples"] == DEFAULT_MAX_RETAIN_SAMPLES
    _, data_args, _, _, _ = parse_unlearn_args([*REQUIRED_FLAGS, "--max_retain_samples", "0"])
    assert data_args.max_retain_samples is None
    with pytest.raises(DeepCleanError, match="--max_retain_samples: got -5; expected a positive integer, or 0"):
        DataArguments(dataset_name="csv", forget="class:1", max_retain_samples=-5)


@pytest.mark.parametrize(
    ("given", "language_model", "expected"),
    [(None, False, True), (None, True, False), (True, True, True), (False, False, False)],
)
def test_early_stopping_default_is_on_for_classifiers_and_off_for_language_models(given, language_model, expected):
    """`--early_stopping` left unset is decided per model type; a value given is kept either way."""
    from hf_deepclean.pipeline.deepclean import concrete_config

    config = concrete_config(DeepCleanConfig(early_stopping=given), base_known=False, language_model=language_model)
    assert config.early_stopping is expected and config.reset == "init"


def test_parse_required_flags_only_gives_defaults():
    model_args, data_args, method, output_args, debug = parse_unlearn_args(REQUIRED_FLAGS)
    assert model_args == ModelArguments("m")
    assert data_args == DataArguments(dataset_name="csv", forget="class:1")
    assert method == DeepCleanConfig()
    assert output_args == OutputArguments(output_dir="o")
    assert debug is False


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


RUN_YAML = """\
model_name_or_path: tiny-bert
dataset_name: csv
forget: random:0.1
output_dir: cleaned
gamma: 3.0
learning_rate: 0.01
data_files: [train=a.csv, test=b.csv]
"""


def test_config_yaml_values_are_defaults_that_flags_override(tmp_path):
    path = write_yaml(tmp_path, RUN_YAML)
    model_args, data_args, method, output_args, _ = parse_unlearn_args(
        ["--config", path, "--gamma", "5", "--forget", "class:pos"]
    )
    assert method.gamma == 5.0  # the flag wins
    assert method.learning_rate == 0.01  # only in the yaml
    assert data_args.forget == "class:pos"  # a required value in the yaml, overridden
    # required arguments satisfied by the yaml alone
    assert model_args.model_name_or_path == "tiny-bert"
    assert data_args.dataset_name == "csv"
    assert data_args.data_files == ["train=a.csv", "test=b.csv"]
    assert output_args.output_dir == "cleaned"
    assert method.reset_fraction is None  # neither in the yaml nor on the command line: decided per model


def test_config_yaml_alone_is_enough(tmp_path):
    _, _, method, output_args, _ = parse_unlearn_args(["--config", write_yaml(tmp_path, RUN_YAML)])
    assert method.gamma == 3.0
    assert output_args.output_dir == "cleaned"


def test_config_yaml_values_are_validated(tmp_path):
    path = write_yaml(tmp_path, RUN_YAML.replace("gamma: 3.0", "gamma: -2.0"))
    with pytest.raises(DeepCleanError, match="^--gamma: got -2.0"):
        parse_unlearn_args(["--config", path])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (RUN_YAML + "gama: 2.0\n", r"unknown keys \['gama'\]"),
        (RUN_YAML + "config: other.yaml\n", r"unknown keys \['config'\]"),
        ("- gamma\n- 3.0\n", "must hold a mapping"),
        ("just a string\n", "must hold a mapping"),
        ("gamma: [1, 2\n", "could not read"),
    ],
)
def test_bad_config_yaml_raises_naming_config(tmp_path, text, match):
    path = write_yaml(tmp_path, text)
    with pytest.raises(DeepCleanError, match=match) as error:
        parse_unlearn_args(["--config", path])
    assert str(error.value).startswith("--config: ")
    assert path in str(error.value)


def test_missing_config_file_raises_naming_config(tmp_path):
    with pytest.raises(DeepCleanError, match="^--config: could not read"):
        parse_unlearn_args(["--config", str(tmp_path / "missing.yaml")])


# --------------------------------------------------------------------------------------------------------------
# main: exit codes, one-line errors, help
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "argument"),
    [
        (["--gamma", "-1"], "--gamma"),
        (["--reset_fraction", "1.5"], "--reset_fraction"),
        (["--per_device_batch_size", "0"], "--per_device_batch_size"),
        (["--forget", " "], "--forget"),
    ],
)
def test_main_prints_one_error_line_and_exits_2(capsys, flags, argument):
    assert main(["unlearn", *REQUIRED_FLAGS, *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"hf-deepclean unlearn: error: {argument}: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_main_reports_a_bad_config_file_on_one_line(capsys, tmp_path):
    path = write_yaml(tmp_path, RUN_YAML + "unknown_key: 1\n")
    assert main(["unlearn", "--config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hf-deepclean unlearn: error: --config: ")


def test_main_debug_shows_the_exception():
    with pytest.raises(DeepCleanError, match="^--gamma: "):
        main(["unlearn", *REQUIRED_FLAGS, "--gamma", "-1", "--debug"])


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "unlearn" in out
    assert "demo" in out


def test_unlearn_help_mentions_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    names = [f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)]
    missing = [name for name in names if f"--{name}" not in out]
    assert missing == []
    assert "--config" in out
    assert "--debug" in out


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--gamma", "abc"], "--gamma"), (["--reset", "ones"], "--reset"), (["--no_such_flag", "1"], "--no_such_flag")],
)
def test_argparse_usage_errors_are_one_line(capsys, flags, needle):
    assert main(["unlearn", *REQUIRED_FLAGS, *flags]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hf-deepclean unlearn: error: ") and needle in lines[0]


def test_missing_required_arguments_are_named_on_one_line(capsys):
    assert main(["unlearn"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--model_name_or_path" in lines[0] and "--forget" in lines[0]


def test_preset_sets_defaults_under_the_config_file_and_the_flags(tmp_path):
    paper = parse_unlearn_args([*REQUIRED_FLAGS, "--preset", "paper"])[2]
    assert paper == DeepCleanConfig.from_preset("paper")
    assert (paper.reset, paper.gamma, paper.reset_fraction) == ("zero", 10.0, None)
    # a flag beats the preset
    assert parse_unlearn_args([*REQUIRED_FLAGS, "--preset", "paper", "--reset", "init"])[2].reset == "init"
    # the file beats the preset, the flag beats the file; `preset:` may also come from the file
    path = write_yaml(tmp_path, "preset: paper\ngamma: 5.0\n")
    method = parse_unlearn_args([*REQUIRED_FLAGS, "--config", path])[2]
    assert (method.reset, method.gamma) == ("zero", 5.0)
    assert parse_unlearn_args([*REQUIRED_FLAGS, "--config", path, "--gamma", "7"])[2].gamma == 7.0
    # without a preset, nothing changes
    assert parse_unlearn_args(REQUIRED_FLAGS)[2] == DeepCleanConfig()


def test_unknown_preset_is_one_line_naming_the_flag():
    with pytest.raises(DeepCleanError, match=r"^--preset: got 'papr'; expected one of default, paper, finetuned\.$"):
        parse_unlearn_args([*REQUIRED_FLAGS, "--preset", "papr"])


def test_config_yaml_string_for_a_list_argument_is_one_element(tmp_path):
    path = write_yaml(tmp_path, RUN_YAML + "data_files: /data/train.csv\n")
    _, data_args, _, _, _ = parse_unlearn_args(["--config", path])
    assert data_args.data_files == ["/data/train.csv"]


# --------------------------------------------------------------------------------------------------------------
# Hub arguments (unlearn --push_to_hub, and the push command)
# --------------------------------------------------------------------------------------------------------------


def test_parse_hub_flags():
    argv = [*REQUIRED_FLAGS, "--push_to_hub", "--hub_model_id", "org/x", "--hub_private_repo", "false"]
    output_args = parse_unlearn_args([*argv, "--hub_revision", "exp-1"])[3]
    assert output_args == OutputArguments(
        output_dir="o", push_to_hub=True, hub_model_id="org/x", hub_private_repo=False, hub_revision="exp-1"
    )
    defaults = OutputArguments("o")
    assert (defaults.push_to_hub, defaults.hub_model_id, defaults.hub_private_repo) == (False, None, True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hub_model_id": "a/b/c"}, "--hub_model_id: got 'a/b/c'; expected a Hub repository id"),
        ({"hub_model_id": "bad id"}, "--hub_model_id: got 'bad id'; expected a Hub repository id"),
        ({"push_to_hub": True}, "--hub_model_id: got None; expected ORG/NAME when --push_to_hub is set."),
        ({"hub_revision": "two words"}, "--hub_revision: got 'two words'; expected a branch name"),
        ({"hub_revision": ""}, "--hub_revision: got ''; expected a branch name"),
    ],
)
def test_bad_hub_values(values, message):
    with pytest.raises(DeepCleanError) as error:
        OutputArguments("o", **values)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["push", "out"], "the following arguments are required: --hub_model_id"),
        (["push", "--hub_model_id", "org/x"], "the following arguments are required: output_dir"),
        (
            ["push", "out", "--hub_model_id", "org/x", "--hub_private_repo", "maybe"],
            "--hub_private_repo: Truthy value expected: got maybe",
        ),
        (["push", "out", "--hub_model_id", "a/b/c"], "--hub_model_id: got 'a/b/c'"),
        (["push", "out", "--hub_model_id", "org/x"], "output_dir: 'out' is not an hf_deepclean output folder"),
    ],
)
def test_push_command_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("hf-deepclean push: error: ") and message in error
