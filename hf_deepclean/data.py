"""Load dataset splits, resolve the forget specification, and build the forget / retain / test loaders.

The forget set is resolved against the *raw* training split (before any preprocessing), so row indices are the
dataset's own. Only counts and a SHA-256 of the sorted row indices ever leave this module for reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk
from torch.utils.data import DataLoader
from transformers import PretrainedConfig

from .causal_lm import CausalLMCollator
from .config import FILE_BUILDERS, DataArguments
from .errors import DeepCleanError


TEXT_COLUMN_NAMES = ("text", "sentence", "content", "review", "document")
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")


# --------------------------------------------------------------------------------------------------------------
# Forget specification
# --------------------------------------------------------------------------------------------------------------

FORGET_FORMS = (
    "split:NAME, indices:FILE, ids:COLUMN:FILE, where:COLUMN==VALUE (or !=, or 'COLUMN in A,B'), "
    "random:FRACTION, random:COUNT, class:LABEL"
)
_WHERE_PATTERN = re.compile(
    r"^(?P<column>[^=!]+?)\s*(?P<op>==|!=)\s*(?P<value>.*)$|^(?P<icol>.+?)\s+in\s+(?P<ivals>.+)$"
)


@dataclass(frozen=True)
class ForgetSpec:
    """A parsed `--forget` value.

    Attributes:
        kind: `split`, `indices`, `ids`, `where`, `random` or `class`.
        raw: the string as given (used in error messages).
        column: column for `ids` and `where`.
        operator: `==`, `!=` or `in` for `where`.
        values: the value(s) for `where`, the split name, the label or the file path.
        fraction / count: for `random`.
    """

    kind: str
    raw: str
    column: str | None = None
    operator: str | None = None
    values: tuple[str, ...] = ()
    fraction: float | None = None
    count: int | None = None


def _spec_error(spec: str, problem: str) -> DeepCleanError:
    return DeepCleanError(f"--forget: {spec!r} {problem}; accepted forms: {FORGET_FORMS}.")


def parse_forget_spec(spec: str) -> ForgetSpec:
    """Parse a `--forget` string without touching any data.

    Raises:
        DeepCleanError: naming the spec, for anything malformed.
    """
    if not isinstance(spec, str):
        raise _spec_error(str(spec), "is not a string")
    kind, sep, rest = spec.partition(":")
    kind = kind.strip()
    if not sep:
        raise _spec_error(spec, "has no 'KIND:' prefix")
    if kind in ("split", "indices", "class"):
        if not rest.strip():
            raise _spec_error(spec, f"gives no value after '{kind}:'")
        return ForgetSpec(kind=kind, raw=spec, values=(rest.strip(),))
    if kind == "ids":
        column, sep, path = rest.partition(":")
        if not sep or not column.strip() or not path.strip():
            raise _spec_error(spec, "must be ids:COLUMN:FILE")
        return ForgetSpec(kind=kind, raw=spec, column=column.strip(), values=(path.strip(),))
    if kind == "where":
        match = _WHERE_PATTERN.match(rest.strip())
        if match is None:
            raise _spec_error(spec, "must be where:COLUMN==VALUE, where:COLUMN!=VALUE or where:COLUMN in A,B")
        if match.group("op"):
            column, operator, values = match.group("column"), match.group("op"), (match.group("value").strip(),)
            if not values[0]:
                raise _spec_error(spec, "gives no value after the operator")
        else:
            column, operator = match.group("icol"), "in"
            values = tuple(v.strip() for v in match.group("ivals").split(","))
            if not all(values):
                raise _spec_error(spec, "has an empty value in its 'in' list")
        if not column.strip():
            raise _spec_error(spec, "names no column")
        return ForgetSpec(kind=kind, raw=spec, column=column.strip(), operator=operator, values=values)
    if kind == "random":
        text = rest.strip()
        if re.fullmatch(r"\d+", text):
            count = int(text)
            if count < 1:
                raise _spec_error(spec, "asks for no rows")
            return ForgetSpec(kind=kind, raw=spec, count=count)
        try:
            fraction = float(text)
        except ValueError:
            raise _spec_error(spec, "needs a fraction in (0, 1) or a positive row count") from None
        if not (0.0 < fraction < 1.0):
            raise _spec_error(spec, "needs a fraction in (0, 1) or a positive row count")
        return ForgetSpec(kind=kind, raw=spec, fraction=fraction)
    raise _spec_error(spec, f"has unknown kind {kind!r}")


def redact_forget_spec(spec: str | ForgetSpec) -> str:
    """The spec as it may be recorded: `where:` values and `ids:` files can identify people, so they are dropped."""
    parsed = parse_forget_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "where":
        return f"where:{parsed.column} {parsed.operator} <redacted>"
    if parsed.kind == "ids":
        return f"ids:{parsed.column}:<redacted>"
    return parsed.raw


def _read_listed_values(path: str, spec: str) -> list[Any]:
    """Values from a file: a JSON list, or one value per line."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise _spec_error(spec, f"refers to a file that cannot be read ({type(error).__name__})") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError:
            raise _spec_error(spec, "refers to a file that is not a valid JSON list") from None
        if not isinstance(values, list):
            raise _spec_error(spec, "refers to a JSON file that is not a list")
        return values
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_indices(values: list[Any], spec: str) -> list[int]:
    indices = []
    for value in values:
        if isinstance(value, bool):
            raise _spec_error(spec, "lists a value that is not a row index")
        if isinstance(value, int) and value >= 0:
            indices.append(value)
        elif isinstance(value, str) and re.fullmatch(r"\d+", value):
            indices.append(int(value))
        else:
            raise _spec_error(spec, "lists a value that is not a non-negative integer row index")
    return indices


def _label_names(feature: Any) -> list[str] | None:
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _value_matches(
    column_values: Sequence[Any], feature: Any, wanted: set[str], label2id: Mapping[str, int] | None = None
) -> np.ndarray:
    """Rows whose value is in `wanted`, compared as strings.

    For a ClassLabel column, label names take precedence: when any wanted value is a class name, only names match
    (so `2` means the class named "2", not id 2, in a 1-5 star rating). For plain integer labels, `label2id` (the
    model's label names) lets a class be named too.
    """
    names = _label_names(feature)
    if names is not None and wanted & set(names):
        ids = {i for i, name in enumerate(names) if name in wanted}
        return np.array([value in ids for value in column_values], dtype=bool)
    # a ClassLabel stores a missing label as -1: never match it through an id
    direct = np.array([str(value) in wanted and value != -1 for value in column_values], dtype=bool)
    if names is None and label2id and not direct.any() and wanted & set(label2id):
        ids = {label2id[name] for name in wanted if name in label2id}
        return np.array([isinstance(value, int) and value in ids for value in column_values], dtype=bool)
    return direct


@dataclass
class ForgetSelection:
    """The resolved forget set.

    Attributes:
        split: split the forget rows come from (the training split, or the one named by `split:NAME`).
        indices: sorted row indices in `split`.
        sha256: SHA-256 of the sorted row indices, one decimal per line, prefixed by the split name.
    """

    spec: str
    split: str
    indices: list[int]
    sha256: str = field(init=False)

    def __post_init__(self):
        payload = self.split + "\n" + "\n".join(str(i) for i in self.indices)
        self.sha256 = hashlib.sha256(payload.encode()).hexdigest()

    @property
    def num_rows(self) -> int:
        return len(self.indices)

    @property
    def is_separate_split(self) -> bool:
        return self.spec.startswith("split:")


def resolve_forget_set(
    spec: str | ForgetSpec,
    splits: DatasetDict,
    *,
    train_split: str = "train",
    label_column: str | None = None,
    label2id: Mapping[str, int] | None = None,
    seed: int = 42,
) -> ForgetSelection:
    """Find the rows `spec` selects.

    Args:
        spec: the `--forget` string (or its parsed form).
        splits: all splits of the dataset; rows are resolved against `splits[train_split]` except for `split:`.
        train_split: the split the model was trained on.
        label_column: the label column, needed by `class:LABEL`.
        label2id: the model's label names, so that `class:NAME` works on integer label columns.
        seed: seed of `random:` sampling.

    Returns:
        The selection: split, sorted row indices and their SHA-256.

    Raises:
        DeepCleanError: naming the spec when it selects nothing, every training row, or rows that do not exist.
    """
    parsed = parse_forget_spec(spec) if isinstance(spec, str) else spec
    # errors from here on name the spec without `where:` values or `ids:` files, which may identify people
    raw = redact_forget_spec(parsed)
    if train_split not in splits:
        raise DeepCleanError(f"--train_split: got {train_split!r}; the dataset has splits {sorted(splits)}.")
    train = splits[train_split]
    num_rows = len(train)

    if parsed.kind == "split":
        name = parsed.values[0]
        if name == train_split:
            raise _spec_error(raw, "names the training split itself (it would forget every row)")
        if name not in splits:
            raise _spec_error(raw, f"names a split that does not exist (splits: {sorted(splits)})")
        if len(splits[name]) == 0:
            raise _spec_error(raw, "names an empty split")
        return ForgetSelection(spec=raw, split=name, indices=list(range(len(splits[name]))))

    if parsed.kind == "indices":
        indices = sorted(set(_parse_indices(_read_listed_values(parsed.values[0], raw), raw)))
        out_of_range = [i for i in indices if i >= num_rows]
        if out_of_range:
            raise _spec_error(
                raw, f"lists {len(out_of_range)} row indices beyond the {num_rows} rows of split {train_split!r}"
            )
    elif parsed.kind == "random":
        count = parsed.count if parsed.count is not None else round(parsed.fraction * num_rows)
        if count >= num_rows:
            raise _spec_error(raw, f"selects {count} of {num_rows} rows, i.e. all of them")
        if count < 1:
            raise _spec_error(raw, f"selects no rows of the {num_rows} in split {train_split!r}")
        generator = np.random.default_rng(seed)
        indices = sorted(generator.choice(num_rows, size=count, replace=False).tolist())
    else:
        column = label_column if parsed.kind == "class" else parsed.column
        if column is None:
            raise _spec_error(raw, "needs a label column (pass --label_column)")
        if column not in train.column_names:
            raise _spec_error(raw, f"names column {column!r}, which is not in {train.column_names}")
        column_values = list(train[column])
        feature = train.features[column]
        if parsed.kind == "ids":
            wanted = {str(v) for v in _read_listed_values(parsed.values[0], raw)}
            matches = _value_matches(column_values, feature, wanted)
            found = {str(v) for v, m in zip(column_values, matches) if m}
            if len(found) < len(wanted):
                raise _spec_error(raw, f"lists {len(wanted) - len(found)} ids that match no row of {column!r}")
        elif parsed.kind == "class":
            matches = _value_matches(column_values, feature, set(parsed.values), label2id)
            if not matches.any():
                known = _label_names(feature) or sorted({str(v) for v in column_values})
                shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
                raise _spec_error(raw, f"names an unknown label (labels in {column!r}: {shown})")
        else:  # where
            matches = _value_matches(column_values, feature, set(parsed.values))
            if parsed.operator == "!=":
                matches = ~matches
        indices = np.flatnonzero(matches).tolist()

    if not indices:
        raise _spec_error(raw, f"selects no rows of split {train_split!r}")
    if len(indices) >= num_rows:
        raise _spec_error(raw, f"selects all {num_rows} rows of split {train_split!r}; nothing would be retained")
    return ForgetSelection(spec=raw, split=train_split, indices=indices)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _parse_data_files(data_files: list[str] | None, train_split: str) -> dict[str, list[str]] | None:
    if not data_files:
        return None
    files: dict[str, list[str]] = {}
    for entry in data_files:
        split, sep, path = entry.partition("=")
        if not sep:
            split, path = train_split, entry
        if not path or not split:
            raise DeepCleanError(f"--data_files: got {entry!r}; expected PATH or SPLIT=PATH.")
        if not os.path.exists(path):
            raise DeepCleanError(f"--data_files: {path!r} does not exist.")
        files.setdefault(split, []).append(path)
    return files


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
    )


def _empty_split_error(
    data_args: DataArguments, data_files: dict[str, list[str]] | None, split: str
) -> DeepCleanError:
    if data_files is not None:
        return DeepCleanError(
            f"--data_files: split {split!r} ({', '.join(data_files.get(split, []))}) has no rows; expected at least one row."
        )
    return DeepCleanError(
        f"--dataset_name: split {split!r} of {data_args.dataset_name!r} has no rows; expected at least one row."
    )


def _dataset_load_error(
    data_args: DataArguments, data_files: dict[str, list[str]] | None, error: Exception
) -> DeepCleanError:
    """One line for a dataset that does not load: the argument, its value, the underlying cause, what is accepted."""
    empty = re.match(r'Instruction "(.+?)" corresponds to no data', str(error))
    if data_files is not None and empty:  # a file with a header and no rows
        return _empty_split_error(data_args, data_files, empty.group(1))
    # `DatasetGenerationError` only says that generation failed; the parser's error says why
    cause = error.__cause__ if type(error).__name__ == "DatasetGenerationError" and error.__cause__ else error
    lines = str(cause).strip().splitlines()
    reason = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    name = data_args.dataset_name
    if data_files is not None:
        files = ", ".join(f"{split}={path}" for split, paths in data_files.items() for path in paths)
        return DeepCleanError(
            f"--data_files: could not load {files} as {name} ({reason}); expected valid {name} files (text in UTF-8)."
        )
    return DeepCleanError(
        f"--dataset_name: could not load {name!r} ({reason}); expected a Hub dataset id, a `save_to_disk` folder, "
        "or csv/json/parquet with --data_files."
    )


def load_dataset_splits(data_args: DataArguments) -> DatasetDict:
    """Load every split of the dataset named by `--dataset_name` (Hub id, saved folder, or file builder)."""
    name = data_args.dataset_name
    data_files = _parse_data_files(data_args.data_files, data_args.train_split)
    try:
        if _is_saved_dataset(name):
            loaded = load_from_disk(name)
        elif data_files is not None:
            loaded = load_dataset(name, data_args.dataset_config_name, data_files=data_files)
        else:
            if name in FILE_BUILDERS:
                raise DeepCleanError(f"--dataset_name: {name!r} needs --data_files.")
            loaded = load_dataset(name, data_args.dataset_config_name, revision=data_args.dataset_revision)
    except DeepCleanError:
        raise
    except Exception as error:  # datasets raises many types; each becomes one clear line
        if data_files is not None and len(data_files) > 1:
            # a failure of one file can surface as a confusing error about the set: name the split that fails alone
            for split, paths in data_files.items():
                try:
                    load_dataset(name, data_args.dataset_config_name, data_files={split: paths})
                except Exception as split_error:
                    raise _dataset_load_error(data_args, {split: paths}, split_error) from split_error
        raise _dataset_load_error(data_args, data_files, error) from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({data_args.train_split: loaded})
    if not isinstance(loaded, DatasetDict):
        raise DeepCleanError(f"--dataset_name: {name!r} did not load as a dataset with splits.")
    if data_args.train_split not in loaded:
        raise DeepCleanError(f"--train_split: got {data_args.train_split!r}; the dataset has splits {sorted(loaded)}.")
    if len(loaded[data_args.train_split]) == 0:
        raise _empty_split_error(data_args, data_files, data_args.train_split)
    return loaded


def resolve_eval_split(splits: DatasetDict, data_args: DataArguments, forget: ForgetSelection) -> str | None:
    """The held-out split: `--eval_split`, else `test`, else `validation` (never the train or forget split)."""
    if data_args.eval_split is not None:
        if data_args.eval_split not in splits:
            raise DeepCleanError(
                f"--eval_split: got {data_args.eval_split!r}; the dataset has splits {sorted(splits)}."
            )
        if data_args.eval_split in (data_args.train_split, forget.split):
            raise DeepCleanError(
                f"--eval_split: got {data_args.eval_split!r}; expected a held-out split, not the train or forget split."
            )
        return data_args.eval_split
    for candidate in ("test", "validation"):
        if candidate in splits and candidate not in (data_args.train_split, forget.split) and len(splits[candidate]):
            return candidate
    return None


# --------------------------------------------------------------------------------------------------------------
# Columns and labels
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    label: str | None  # None for causal LMs, which learn the text itself
    text: str | None = None
    text_pair: str | None = None
    image: str | None = None


def _pick_column(argument: str, requested: str | None, dataset: Dataset, candidates: list[str], what: str) -> str:
    if requested is not None:
        if requested not in dataset.column_names:
            raise DeepCleanError(f"--{argument}: got {requested!r}; the dataset has columns {dataset.column_names}.")
        return requested
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DeepCleanError(f"--{argument}: no {what} column found among {dataset.column_names}; pass --{argument}.")
    raise DeepCleanError(f"--{argument}: ambiguous, several {what} columns {candidates}; pass --{argument}.")


def resolve_text_column(dataset: Dataset, data_args: DataArguments, label: str | None = None) -> str:
    """`--text_column`, else the one column with a usual text name, else the one string column (not `label`)."""
    features = dataset.features
    text_candidates = [c for c in TEXT_COLUMN_NAMES if c in features]
    if not text_candidates:
        text_candidates = [
            c
            for c, f in features.items()
            if isinstance(f, Value) and f.dtype in ("string", "large_string") and c != label
        ]
    return _pick_column("text_column", data_args.text_column, dataset, text_candidates, "text")


def resolve_columns(dataset: Dataset, data_args: DataArguments, task: str) -> Columns:
    """Find the label column and the text or image column, from the arguments or by name and feature type.

    A causal LM has no label column: its labels are the text's own tokens.
    """
    if task == "causal-lm":
        return Columns(label=None, text=resolve_text_column(dataset, data_args))
    features = dataset.features
    label_candidates = [c for c, f in features.items() if isinstance(f, ClassLabel)]
    if not label_candidates:
        label_candidates = [c for c in LABEL_COLUMN_NAMES if c in features]
    label = _pick_column("label_column", data_args.label_column, dataset, label_candidates, "label")
    if task == "image-classification":
        image_candidates = [c for c, f in features.items() if isinstance(f, Image)]
        if not image_candidates:
            image_candidates = [c for c in IMAGE_COLUMN_NAMES if c in features]
        return Columns(
            label=label, image=_pick_column("image_column", data_args.image_column, dataset, image_candidates, "image")
        )
    text = resolve_text_column(dataset, data_args, label)
    if data_args.text_pair_column is not None and data_args.text_pair_column not in features:
        raise DeepCleanError(
            f"--text_pair_column: got {data_args.text_pair_column!r}; the dataset has columns {dataset.column_names}."
        )
    return Columns(label=label, text=text, text_pair=data_args.text_pair_column)


def _has_default_label_names(config: PretrainedConfig) -> bool:
    return all(name == f"LABEL_{i}" for i, name in config.id2label.items())


def model_label_names(config: PretrainedConfig) -> dict[str, int] | None:
    """The model's `label2id`, or `None` when it only has the placeholder names `LABEL_i`."""
    return None if _has_default_label_names(config) else {str(k): int(v) for k, v in config.label2id.items()}


def _are_integers(values: set) -> bool:
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)


def build_label_map(splits: Mapping[str, Dataset], column: str, config: PretrainedConfig) -> dict[Any, int] | None:
    """Map the label values of every split used to the model's class ids.

    Args:
        splits: `{split name: dataset}`; the first one (the training split) decides how labels are read, the
            others must hold only labels that map too.
        column: the label column.
        config: the model's config (`num_labels`, `label2id`).

    Returns:
        `None` when the values are already the model's ids, else `{dataset value: model id}`. ClassLabel names
        and string labels are matched to the model's `label2id` when the model has real (non `LABEL_i`) names.

    Raises:
        DeepCleanError: naming --label_column and the split when a value has no class in the model.
    """
    names = _label_names(next(iter(splits.values())).features[column])
    label2id = model_label_names(config)
    values_per_split = {split: set(dataset.unique(column)) for split, dataset in splits.items()}
    for split, values in values_per_split.items():
        if None in values or -1 in values:
            raise DeepCleanError(f"--label_column: split {split!r} has rows without a label in {column!r}.")

    if names is not None and label2id is not None:
        missing = sorted(n for n in names if n not in label2id)
        if missing:
            raise DeepCleanError(
                f"--label_column: labels {missing[:10]} of {column!r} are not among the model's labels "
                f"{sorted(label2id)[:10]}."
            )
        label_map = {i: label2id[n] for i, n in enumerate(names)}
    elif all(_are_integers(values) for values in values_per_split.values()):
        label_map = None
    elif label2id is None:
        raise DeepCleanError(
            f"--label_column: {column!r} holds label names but the model has no names for its "
            f"{config.num_labels} labels (only LABEL_i); expected integer class ids."
        )
    else:
        label_map = dict(label2id)
    for split, values in values_per_split.items():
        if label_map is None:
            bad = sorted(v for v in values if not 0 <= v < config.num_labels)
            expected = f"ids 0..{config.num_labels - 1}"
        else:
            bad = sorted((str(v) for v in values if v not in label_map), key=str)
            expected = f"the model's labels {sorted(label2id or {})[:10]}"
        if bad:
            raise DeepCleanError(
                f"--label_column: split {split!r} holds labels {bad[:10]} in {column!r}; expected {expected}."
            )
    return label_map


# --------------------------------------------------------------------------------------------------------------
# Collators and loaders
# --------------------------------------------------------------------------------------------------------------


class ClassificationCollator:
    """Turn raw rows into model inputs: tokenise texts or process images, map labels to class ids.

    Processing happens at batch time so that no preprocessed copy of private data lands in a cache on disk.
    """

    def __init__(
        self,
        processor,
        columns: Columns,
        label_map: dict[Any, int] | None,
        max_length: int | None = None,
        image_mode: str = "RGB",
    ):
        self.processor = processor
        self.columns = columns
        self.label_map = label_map
        self.max_length = max_length
        self.image_mode = image_mode

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.columns.image is not None:
            images = [_convert_image(row[self.columns.image], self.image_mode) for row in rows]
            batch = dict(self.processor(images, return_tensors="pt"))
        else:
            texts = [row[self.columns.text] for row in rows]
            pairs = [row[self.columns.text_pair] for row in rows] if self.columns.text_pair else None
            batch = dict(
                self.processor(
                    texts,
                    pairs,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            )
        labels = [row[self.columns.label] for row in rows]
        if self.label_map is not None:
            labels = [self.label_map[label] for label in labels]
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def _convert_image(image, mode: str):
    """PIL images in the colour mode the model expects (`RGB`, or `L` for one-channel models)."""
    if hasattr(image, "convert") and getattr(image, "mode", mode) != mode:
        return image.convert(mode)
    return image


def make_dataloader(
    dataset: Dataset, collator: Callable, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over raw rows; shuffling is seeded so a run is reproducible."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)


def subsample(dataset: Dataset, max_rows: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most `max_rows` rows (the dataset itself when it is small enough)."""
    if max_rows is None or len(dataset) <= max_rows:
        return dataset
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=max_rows, replace=False))
    return dataset.select(indices.tolist())


def make_collator(
    task: str,
    processor,
    columns: Columns,
    label_map: dict[Any, int] | None,
    max_length: int | None,
    model_config: PretrainedConfig,
) -> Callable:
    """The batch-time collator of `task`: classification inputs and class ids, or causal-LM token labels."""
    if task == "causal-lm":
        return CausalLMCollator(processor, columns.text, max_length)
    image_mode = "L" if getattr(model_config, "num_channels", 3) == 1 else "RGB"
    return ClassificationCollator(processor, columns, label_map, max_length, image_mode=image_mode)


@dataclass
class UnlearningData:
    """Everything the unlearner needs from the data side."""

    forget: Dataset
    retain: Dataset
    test: Dataset | None
    selection: ForgetSelection
    columns: Columns
    collator: Callable
    eval_split: str | None
    info: dict[str, Any]


def prepare_unlearning_data(
    data_args: DataArguments, splits: DatasetDict, task: str, model_config: PretrainedConfig, processor, seed: int
) -> UnlearningData:
    """Resolve columns, labels and the forget set; split the training data into forget and retain.

    Args:
        data_args: the data arguments (forget spec, splits, columns, lengths).
        splits: every split of the dataset.
        task: `text-classification`, `image-classification` or `causal-lm`.
        model_config: the model's config, for its labels (and image channels).
        processor: the tokenizer or image processor the collator applies at batch time.
        seed: seed of `random:` forget specs.

    Returns:
        The forget, retain and held-out datasets (only the needed columns), the selection, the collator and a
        record of the data's identity (names, splits, fingerprints, row counts) for the reports.
    """
    train = splits[data_args.train_split]
    columns = resolve_columns(train, data_args, task)
    needed = [c for c in (columns.text, columns.text_pair, columns.image, columns.label) if c]
    if data_args.forget is None:  # no forget set (`hf-deepclean fisher` over every row): retain = train
        selection = ForgetSelection(spec="none", split=data_args.train_split, indices=[])
    else:
        selection = resolve_forget_set(
            data_args.forget,
            splits,
            train_split=data_args.train_split,
            label_column=columns.label,
            label2id=model_label_names(model_config),
            seed=seed,
        )
    eval_split = resolve_eval_split(splits, data_args, selection)
    used = {data_args.train_split: train}
    if selection.is_separate_split:
        used[selection.split] = splits[selection.split]
    if eval_split is not None:
        used[eval_split] = splits[eval_split]
    for name, split in used.items():
        missing = [c for c in needed if c not in split.column_names]
        if missing:
            raise DeepCleanError(f"--dataset_name: split {name!r} lacks columns {missing}.")
    label_map = build_label_map(used, columns.label, model_config) if columns.label is not None else None
    if selection.is_separate_split:
        forget, retain = splits[selection.split], train
    else:
        forget = train.select(selection.indices)
        forget_rows = set(selection.indices)
        retain = train.select([i for i in range(len(train)) if i not in forget_rows])
    test = splits[eval_split].select_columns(needed) if eval_split is not None else None
    forget, retain = forget.select_columns(needed), retain.select_columns(needed)
    max_length = data_args.max_length
    if columns.text is not None and max_length is None:
        max_length = min(getattr(processor, "model_max_length", 512) or 512, 512)
        if task == "causal-lm":  # positions beyond the model's would fail (GPT-2's tokenizer says 1024 either way)
            max_length = min(max_length, getattr(model_config, "max_position_embeddings", None) or max_length)
    info = {
        "dataset_name": data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "dataset_revision": data_args.dataset_revision,
        "train_split": data_args.train_split,
        "eval_split": eval_split,
        "forget_split": selection.split,
        "fingerprints": {name: split._fingerprint for name, split in splits.items()},
        "num_rows": {
            "train": len(train),
            "forget": len(forget),
            "retain": len(retain),
            "test": len(test) if test is not None else 0,
        },
        "columns": {k: v for k, v in vars(columns).items() if v is not None},
    }
    return UnlearningData(
        forget=forget,
        retain=retain,
        test=test,
        selection=selection,
        columns=columns,
        collator=make_collator(task, processor, columns, label_map, max_length, model_config),
        eval_split=eval_split,
        info=info,
    )
