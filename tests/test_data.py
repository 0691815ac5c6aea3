"""Forget specification, column and label resolution, loading and collation, on tiny in-memory datasets."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from transformers import BertTokenizer, PretrainedConfig

from hf_deepclean.config import DataArguments
from hf_deepclean.data.collators import ClassificationCollator, Columns
from hf_deepclean.data.forget import ForgetSelection, parse_forget_spec, redact_forget_spec, resolve_forget_set
from hf_deepclean.data.loading import build_label_map, load_dataset_splits, resolve_columns
from hf_deepclean.errors import DeepCleanError


NAMES = ["cat", "dog", "bird"]
# 12 rows: label ids cycle 0, 1, 2; `user` ids u0..u11; `uid` ints 100..111; `color` strings.
LABELS = [i % 3 for i in range(12)]
COLORS = ["red", "blue", "green", "red", "red", "blue", "green", "green", "red", "blue", "red", "green"]


def make_train(n: int = 12) -> Dataset:
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=NAMES),
            "user": Value("string"),
            "uid": Value("int64"),
            "color": Value("string"),
        }
    )
    return Dataset.from_dict(
        {
            "text": [f"row {i}" for i in range(n)],
            "label": [i % 3 for i in range(n)],
            "user": [f"u{i}" for i in range(n)],
            "uid": [100 + i for i in range(n)],
            "color": [COLORS[i % len(COLORS)] for i in range(n)],
        },
        features=features,
    )


def make_splits(n: int = 12) -> DatasetDict:
    forget = Dataset.from_dict(
        {"text": ["f0", "f1", "f2"], "label": [0, 1, 0]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=NAMES)}),
    )
    return DatasetDict({"train": make_train(n), "forget": forget, "empty": forget.select([])})


def resolve(spec: str, splits: DatasetDict | None = None, **kwargs) -> ForgetSelection:
    kwargs.setdefault("label_column", "label")
    return resolve_forget_set(spec, make_splits() if splits is None else splits, **kwargs)


def expected_sha(split: str, indices: list[int]) -> str:
    return hashlib.sha256((split + "\n" + "\n".join(str(i) for i in sorted(indices))).encode()).hexdigest()


def data_args(**kwargs) -> DataArguments:
    kwargs.setdefault("dataset_name", "unused")
    kwargs.setdefault("forget", "random:0.1")
    return DataArguments(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# resolve_forget_set: every form selects exactly the right rows
# --------------------------------------------------------------------------------------------------------------


def test_split_form_selects_every_row_of_that_split():
    selection = resolve("split:forget")
    assert selection.split == "forget"
    assert selection.indices == [0, 1, 2]
    assert selection.num_rows == 3
    assert selection.is_separate_split
    assert selection.sha256 == expected_sha("forget", [0, 1, 2])


def test_indices_form_reads_one_index_per_line(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("7\n2\n\n  5  \n2\n")
    selection = resolve(f"indices:{path}")
    assert selection.split == "train"
    assert selection.indices == [2, 5, 7]
    assert not selection.is_separate_split


def test_indices_form_reads_a_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([11, 0, 4, 11, "3"]))
    assert resolve(f"indices:{path}").indices == [0, 3, 4, 11]


def test_ids_form_matches_listed_column_values(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("u9\nu1\nu4\nu1\n")
    assert resolve(f"ids:user:{path}").indices == [1, 4, 9]


def test_ids_form_compares_json_ints_as_strings(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([103, 110]))
    assert resolve(f"ids:uid:{path}").indices == [3, 10]
    strings = Dataset.from_dict({"code": [str(i) for i in range(5)], "label": [0, 1, 0, 1, 0]})
    path.write_text(json.dumps([1, 4]))
    assert resolve(f"ids:code:{path}", DatasetDict({"train": strings})).indices == [1, 4]


def test_where_equal_and_not_equal_on_a_string_column():
    red = [i for i, c in enumerate(COLORS) if c == "red"]
    assert resolve("where:color==red").indices == red
    assert resolve("where:color != red").indices == [i for i in range(12) if i not in red]


def test_where_in_selects_any_listed_value():
    wanted = [i for i, c in enumerate(COLORS) if c in ("blue", "green")]
    assert resolve("where:color in blue, green").indices == wanted


def test_where_on_a_classlabel_column_matches_label_names_and_ids():
    dogs = [i for i, label in enumerate(LABELS) if label == 1]
    assert resolve("where:label==dog").indices == dogs
    assert resolve("where:label==1").indices == dogs
    assert resolve("where:label in cat,bird").indices == [i for i, label in enumerate(LABELS) if label != 1]
    assert resolve("where:label!=cat").indices == [i for i, label in enumerate(LABELS) if label != 0]


def test_where_on_an_int_column_compares_as_strings():
    assert resolve("where:uid==105").indices == [5]


def test_random_fraction_selects_exactly_that_many_distinct_rows():
    splits = make_splits(20)
    selection = resolve_forget_set("random:0.25", splits, seed=3)
    assert len(selection.indices) == round(0.25 * 20) == 5
    assert len(set(selection.indices)) == 5
    assert selection.indices == sorted(selection.indices)
    assert all(0 <= i < 20 for i in selection.indices)


def test_random_is_seeded():
    splits = make_splits(20)
    first = resolve_forget_set("random:0.25", splits, seed=0).indices
    assert resolve_forget_set("random:0.25", splits, seed=0).indices == first
    assert resolve_forget_set("random:0.25", splits, seed=1).indices != first


def test_random_count_selects_exactly_count_rows():
    selection = resolve("random:7", seed=5)
    assert len(selection.indices) == len(set(selection.indices)) == 7
    assert all(0 <= i < 12 for i in selection.indices)


def test_class_form_by_classlabel_name_and_by_id():
    birds = [i for i, label in enumerate(LABELS) if label == 2]
    assert resolve("class:bird").indices == birds
    assert resolve("class:2").indices == birds


def test_class_form_on_a_plain_string_label_column():
    train = Dataset.from_dict({"text": list("abcdef"), "sentiment": ["pos", "neg", "neg", "pos", "neu", "neg"]})
    selection = resolve_forget_set("class:neg", DatasetDict({"train": train}), label_column="sentiment")
    assert selection.indices == [1, 2, 5]


def test_resolve_accepts_a_parsed_spec():
    assert resolve_forget_set(parse_forget_spec("class:dog"), make_splits(), label_column="label").indices == [
        1,
        4,
        7,
        10,
    ]


def test_resolve_against_another_train_split_name():
    splits = DatasetDict({"fit": make_train(), "test": make_train(4)})
    selection = resolve_forget_set("class:cat", splits, train_split="fit", label_column="label")
    assert selection.split == "fit"
    assert selection.indices == [0, 3, 6, 9]


# --------------------------------------------------------------------------------------------------------------
# SHA-256 of the selection
# --------------------------------------------------------------------------------------------------------------


def test_sha256_is_of_split_name_and_sorted_indices(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("9\n3\n4\n")
    selection = resolve(f"indices:{path}")
    assert selection.sha256 == expected_sha("train", [3, 4, 9])
    assert selection.sha256 == hashlib.sha256(b"train\n3\n4\n9").hexdigest()


def test_sha256_changes_with_the_rows_and_the_split():
    base = ForgetSelection(spec="x", split="train", indices=[1, 2, 3])
    assert ForgetSelection(spec="y", split="train", indices=[1, 2, 3]).sha256 == base.sha256
    assert ForgetSelection(spec="x", split="train", indices=[1, 2, 4]).sha256 != base.sha256
    assert ForgetSelection(spec="x", split="train", indices=[1, 2]).sha256 != base.sha256
    assert ForgetSelection(spec="x", split="other", indices=[1, 2, 3]).sha256 != base.sha256
    assert resolve("class:cat").sha256 != resolve("class:dog").sha256


# --------------------------------------------------------------------------------------------------------------
# Malformed and unsatisfiable specs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "random0.1",
        "",
        "rows:1,2",
        "random:0",
        "random:1.5",
        "random:1.0",
        "random:-3",
        "random:abc",
        "random:nan",
        "random:",
        "ids:user",
        "ids:user:",
        "ids::file.txt",
        "where:color",
        "where:==x",
        "where:color in a,,b",
        "where:color in ",
        "split:",
        "indices:  ",
        "class:",
    ],
)
def test_malformed_specs_raise_naming_the_spec(spec):
    with pytest.raises(DeepCleanError) as error:
        parse_forget_spec(spec)
    message = str(error.value)
    assert message.startswith("--forget:")
    assert repr(spec) in message


@pytest.mark.parametrize("spec", ["where:color==", "where:color!= "])
def test_where_with_an_empty_value_is_malformed(spec):
    with pytest.raises(DeepCleanError, match="--forget"):
        parse_forget_spec(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "where:color==purple",  # selects nothing
        "where:color!=purple",  # selects everything
        "where:label!=unused",
        "where:color in red,blue,green",
        "random:12",
        "random:0.01",  # rounds to zero rows of 12
        "random:0.99",  # rounds to every row
        "class:zebra",
        "class:7",
        "where:nope==1",
        "ids:nope:/dev/null",
        "split:nope",
        "split:train",
        "split:empty",
    ],
)
def test_unsatisfiable_specs_raise_naming_the_spec(spec):
    """The error names the spec as it may be logged: `where:` values and `ids:` files are redacted."""
    with pytest.raises(DeepCleanError) as error:
        resolve(spec)
    message = str(error.value)
    assert message.startswith("--forget: ")
    assert redact_forget_spec(spec) in message
    if spec.startswith(("where:", "ids:")):
        value = spec.split("==")[-1].split("!=")[-1].split(" in ")[-1].split(":")[-1]
        assert value not in message.split("accepted forms")[0]
    else:
        assert spec in message


def test_class_without_a_label_column_raises():
    with pytest.raises(DeepCleanError, match="class:cat"):
        resolve_forget_set("class:cat", make_splits(), label_column=None)


def test_unknown_train_split_raises_naming_train_split():
    with pytest.raises(DeepCleanError, match="^--train_split: got 'fit'"):
        resolve_forget_set("random:2", make_splits(), train_split="fit")


@pytest.mark.parametrize(
    ("content", "name"),
    [
        ("3\n12\n", "rows.txt"),  # index 12 is beyond 12 rows
        ("[0, 99]", "rows.json"),
        ("[0, 1", "rows.json"),  # invalid JSON
        ("1\nabc\n", "rows.txt"),
        ("[1, 2.5]", "rows.json"),
        ("[true]", "rows.json"),
        ("1\n-2\n", "rows.txt"),
        ("", "rows.txt"),  # selects nothing
        (json.dumps(list(range(12))), "rows.json"),  # selects everything
    ],
)
def test_bad_indices_files_raise_naming_the_spec(tmp_path, content, name):
    path = tmp_path / name
    path.write_text(content)
    spec = f"indices:{path}"
    with pytest.raises(DeepCleanError) as error:
        resolve(spec)
    assert spec in str(error.value)


def test_negative_json_index_raises(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[-1, 2]")
    with pytest.raises(DeepCleanError, match="indices:"):
        resolve(f"indices:{path}")


def test_unreadable_files_raise_naming_the_spec(tmp_path):
    for spec in (f"indices:{tmp_path / 'missing.txt'}", f"ids:user:{tmp_path / 'missing.txt'}", f"indices:{tmp_path}"):
        with pytest.raises(DeepCleanError) as error:
            resolve(spec)
        assert redact_forget_spec(spec) in str(error.value)
    binary = tmp_path / "rows.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DeepCleanError, match="cannot be read"):
        resolve(f"indices:{binary}")


def test_ids_that_match_no_row_raise(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("u1\nu404\n")
    with pytest.raises(DeepCleanError, match="1 ids that match no row"):
        resolve(f"ids:user:{path}")
    path.write_text("[0, 1")
    with pytest.raises(DeepCleanError, match="not a valid JSON list"):
        resolve(f"ids:user:{path}")


def test_missing_classlabel_value_is_not_the_last_class():
    train = Dataset.from_dict(
        {"label": [-1, 0, 1, 2, 0]}, features=Features({"label": ClassLabel(names=["a", "b", "c"])})
    )
    assert resolve_forget_set("class:c", DatasetDict({"train": train}), label_column="label").indices == [3]


# --------------------------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------------------------


def test_redact_removes_where_values_and_ids_files():
    where = redact_forget_spec("where:name==Alice Smith")
    assert "Alice" not in where
    assert where.startswith("where:name")
    assert "<redacted>" in where
    within = redact_forget_spec("where:city in Paris,Oslo")
    assert "Paris" not in within and "Oslo" not in within
    assert within.startswith("where:city in")
    ids = redact_forget_spec("ids:email:/private/people_to_forget.txt")
    assert ids == "ids:email:<redacted>"


@pytest.mark.parametrize("spec", ["split:forget", "indices:rows.txt", "random:0.1", "random:5", "class:dog"])
def test_redact_keeps_other_forms(spec):
    assert redact_forget_spec(spec) == spec
    assert redact_forget_spec(parse_forget_spec(spec)) == spec


# --------------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------------


def test_resolve_columns_finds_classlabel_and_text():
    columns = resolve_columns(make_train(), data_args(), "text-classification")
    assert columns == Columns(label="label", text="text")


def test_resolve_columns_finds_a_plain_label_column_and_the_only_string_column():
    dataset = Dataset.from_dict({"body": ["x", "y"], "label": [0, 1], "score": [0.5, 0.1]})
    columns = resolve_columns(dataset, data_args(), "text-classification")
    assert columns == Columns(label="label", text="body")


def test_resolve_columns_finds_an_image_feature():
    images = [PILImage.new("RGB", (2, 2), color=(i, 0, 0)) for i in range(2)]
    dataset = Dataset.from_dict(
        {"picture": images, "kind": [0, 1]},
        features=Features({"picture": Image(), "kind": ClassLabel(names=["a", "b"])}),
    )
    columns = resolve_columns(dataset, data_args(), "image-classification")
    assert columns == Columns(label="kind", image="picture")


def test_resolve_columns_uses_named_columns():
    dataset = Dataset.from_dict({"q": ["x"], "a": ["y"], "y": [1], "label": [0]})
    columns = resolve_columns(
        dataset, data_args(text_column="q", text_pair_column="a", label_column="y"), "text-classification"
    )
    assert columns == Columns(label="y", text="q", text_pair="a")


def test_two_string_columns_without_standard_names_are_ambiguous():
    dataset = Dataset.from_dict({"title": ["x"], "body": ["y"], "label": [0]})
    with pytest.raises(DeepCleanError, match="^--text_column: ambiguous"):
        resolve_columns(dataset, data_args(), "text-classification")


def test_two_classlabel_columns_are_ambiguous():
    dataset = Dataset.from_dict(
        {"text": ["x"], "topic": [0], "mood": [1]},
        features=Features(
            {"text": Value("string"), "topic": ClassLabel(names=["a", "b"]), "mood": ClassLabel(names=["c", "d"])}
        ),
    )
    with pytest.raises(DeepCleanError, match="^--label_column: ambiguous"):
        resolve_columns(dataset, data_args(), "text-classification")
    assert resolve_columns(dataset, data_args(label_column="mood"), "text-classification").label == "mood"


def test_no_label_column_raises_naming_the_argument():
    dataset = Dataset.from_dict({"text": ["x"], "target": [0]})
    with pytest.raises(DeepCleanError, match="^--label_column: no label column"):
        resolve_columns(dataset, data_args(), "text-classification")


@pytest.mark.parametrize("argument", ["label_column", "text_column", "text_pair_column", "image_column"])
def test_named_column_that_does_not_exist_raises_naming_the_argument(argument):
    task = "image-classification" if argument == "image_column" else "text-classification"
    with pytest.raises(DeepCleanError) as error:
        resolve_columns(make_train(), data_args(**{argument: "missing"}), task)
    assert str(error.value).startswith(f"--{argument}: got 'missing'")


# --------------------------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------------------------


def named_config(id2label: dict[int, str]) -> PretrainedConfig:
    return PretrainedConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()})


def test_classlabel_names_map_to_the_models_label2id():
    dataset = Dataset.from_dict(
        {"label": [0, 1, 2]}, features=Features({"label": ClassLabel(names=["cat", "dog", "bird"])})
    )
    config = named_config({0: "bird", 1: "cat", 2: "dog"})
    assert build_label_map({"train": dataset}, "label", config) == {0: 1, 1: 2, 2: 0}


def test_classlabel_names_the_model_lacks_raise():
    dataset = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["cat", "fish"])}))
    with pytest.raises(DeepCleanError, match=r"^--label_column: labels \['fish'\]"):
        build_label_map({"train": dataset}, "label", named_config({0: "cat", 1: "dog"}))


def test_int_labels_in_range_need_no_map():
    dataset = Dataset.from_dict({"label": [0, 2, 1, 2]})
    assert build_label_map({"train": dataset}, "label", PretrainedConfig(num_labels=3)) is None
    classlabel = dataset.cast_column("label", ClassLabel(names=["a", "b", "c"]))
    assert build_label_map({"train": classlabel}, "label", PretrainedConfig(num_labels=3)) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [([0, 1, 3], r"split 'train' holds labels \[3\]"), ([0, -1], "split 'train' has rows without a label")],
)
def test_int_labels_out_of_range_raise(values, message):
    dataset = Dataset.from_dict({"label": values})
    with pytest.raises(DeepCleanError, match=f"^--label_column: {message}"):
        build_label_map({"train": dataset}, "label", PretrainedConfig(num_labels=3))


def test_labels_of_every_split_used_are_checked():
    train = Dataset.from_dict({"mood": ["neg", "pos"]})
    config = named_config({0: "neg", 1: "pos"})
    with pytest.raises(DeepCleanError, match=r"^--label_column: split 'test' holds labels \['neu'\]"):
        build_label_map({"train": train, "test": Dataset.from_dict({"mood": ["pos", "neu"]})}, "mood", config)
    with pytest.raises(DeepCleanError, match="^--label_column: split 'test' has rows without a label"):
        build_label_map({"train": train, "test": Dataset.from_dict({"mood": ["pos", None]})}, "mood", config)


def test_missing_classlabel_value_is_refused_with_named_model_labels():
    features = Features({"label": ClassLabel(names=["cat", "dog"])})
    dataset = Dataset.from_dict({"label": [0, 1, -1]}, features=features)
    with pytest.raises(DeepCleanError, match="has rows without a label"):
        build_label_map({"train": dataset}, "label", named_config({0: "cat", 1: "dog"}))


def test_numeric_class_names_take_precedence_over_ids():
    """In a 1-5 star rating, `class:2` is the class named "2" (id 1), not id 2."""
    features = Features({"label": ClassLabel(names=["1", "2", "3", "4", "5"])})
    dataset = Dataset.from_dict({"label": [0, 1, 2, 3, 4, 1, 2]}, features=features)
    assert resolve_forget_set("class:2", DatasetDict(train=dataset), label_column="label").indices == [1, 5]


def test_class_by_model_label_name_on_integer_labels():
    dataset = Dataset.from_dict({"label": [0, 1, 1, 0, 1]})
    splits = DatasetDict(train=dataset)
    selection = resolve_forget_set("class:pos", splits, label_column="label", label2id={"neg": 0, "pos": 1})
    assert selection.indices == [1, 2, 4]
    with pytest.raises(DeepCleanError, match="unknown label"):
        resolve_forget_set("class:pos", splits, label_column="label")


def test_string_labels_map_through_label2id():
    dataset = Dataset.from_dict({"mood": ["neg", "pos", "pos"]})
    assert build_label_map({"train": dataset}, "mood", named_config({0: "pos", 1: "neg"})) == {"pos": 0, "neg": 1}


def test_string_labels_the_model_lacks_raise():
    dataset = Dataset.from_dict({"mood": ["neg", "meh"]})
    with pytest.raises(DeepCleanError, match=r"^--label_column: split 'train' holds labels \['meh'\]"):
        build_label_map({"train": dataset}, "mood", named_config({0: "pos", 1: "neg"}))
    with pytest.raises(DeepCleanError, match="^--label_column"):
        build_label_map({"train": dataset}, "mood", PretrainedConfig(num_labels=2))


def test_bert_config_label_names_are_used():
    from transformers import BertConfig

    dataset = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(names=["pos", "neg"])}))
    config = BertConfig(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    assert build_label_map({"train": dataset}, "label", config) == {0: 1, 1: 0}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def write_csv(path, rows: list[tuple[str, int]]) -> str:
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return str(path)


def test_load_csv_splits_from_data_files(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"t{i}", i % 2) for i in range(10)])
    test = write_csv(tmp_path / "test.csv", [("a", 0), ("b", 1), ("c", 1)])
    splits = load_dataset_splits(data_args(dataset_name="csv", data_files=[f"train={train}", f"test={test}"]))
    assert sorted(splits) == ["test", "train"]
    assert len(splits["train"]) == 10
    assert splits["test"]["text"] == ["a", "b", "c"]
    assert splits["test"]["label"] == [0, 1, 1]


def test_plain_data_file_goes_to_the_train_split(tmp_path):
    train = write_csv(tmp_path / "data.csv", [("a", 0), ("b", 1)])
    splits = load_dataset_splits(data_args(dataset_name="csv", data_files=[train], train_split="fit"))
    assert list(splits) == ["fit"]
    assert splits["fit"]["text"] == ["a", "b"]


def test_load_a_save_to_disk_folder(tmp_path):
    DatasetDict({"train": make_train(), "test": make_train(3)}).save_to_disk(str(tmp_path / "dict"))
    splits = load_dataset_splits(data_args(dataset_name=str(tmp_path / "dict")))
    assert sorted(splits) == ["test", "train"]
    assert splits["train"]["user"] == [f"u{i}" for i in range(12)]
    make_train(5).save_to_disk(str(tmp_path / "single"))
    single = load_dataset_splits(data_args(dataset_name=str(tmp_path / "single")))
    assert list(single) == ["train"]
    assert len(single["train"]) == 5


def test_missing_data_file_raises_naming_data_files(tmp_path):
    missing = str(tmp_path / "missing.csv")
    with pytest.raises(DeepCleanError, match="^--data_files:") as error:
        load_dataset_splits(data_args(dataset_name="csv", data_files=[f"train={missing}"]))
    assert missing in str(error.value)


def test_nonexistent_dataset_raises_naming_dataset_name(tmp_path):
    name = str(tmp_path / "nope")
    with pytest.raises(DeepCleanError, match="^--dataset_name:") as error:
        load_dataset_splits(data_args(dataset_name=name))
    assert name in str(error.value)
    with pytest.raises(DeepCleanError, match="^--dataset_name: 'csv' needs --data_files"):
        load_dataset_splits(data_args(dataset_name="csv"))


def test_missing_train_split_raises_naming_train_split(tmp_path):
    DatasetDict({"train": make_train()}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DeepCleanError, match="^--train_split: got 'fit'"):
        load_dataset_splits(data_args(dataset_name=str(tmp_path / "dict"), train_split="fit"))


# --------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "movie", "very"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_collator_pads_text_and_tensorises_labels(tokenizer):
    collator = ClassificationCollator(tokenizer, Columns(label="label", text="text"), None)
    batch = collator([{"text": "good", "label": 1}, {"text": "a very bad movie", "label": 0}])
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["input_ids"].tolist() == [[2, 6, 3, 0, 0, 0], [2, 5, 9, 7, 8, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0]


def test_collator_applies_the_label_map_and_truncates(tokenizer):
    collator = ClassificationCollator(tokenizer, Columns(label="mood", text="text"), {"pos": 1, "neg": 0}, 4)
    batch = collator([{"text": "a very bad movie", "mood": "neg"}, {"text": "good", "mood": "pos"}])
    assert batch["labels"].tolist() == [0, 1]
    assert batch["input_ids"].tolist() == [[2, 5, 9, 3], [2, 6, 3, 0]]
