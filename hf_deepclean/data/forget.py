"""`--forget` specifications: parsing, redaction for reports, and resolving one to row indices of a split."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import ClassLabel, DatasetDict

from ..errors import DeepCleanError


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
