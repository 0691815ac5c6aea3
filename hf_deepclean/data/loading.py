"""Load dataset splits, resolve columns, labels and the forget specification into forget / retain / held-out rows.

The forget set is resolved against the *raw* training split (before any preprocessing), so row indices are the
dataset's own. Only counts and a SHA-256 of the sorted row indices ever leave this module for reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk
from transformers import PretrainedConfig

from ..config import FILE_BUILDERS, DataArguments
from ..errors import DeepCleanError
from .collators import Columns, make_collator
from .forget import ForgetSelection, _label_names, resolve_forget_set


TEXT_COLUMN_NAMES = ("text", "sentence", "content", "review", "document")
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")
# sequence-to-sequence pairs, by the names datasets usually give them (summaries, translations turned into columns)
SOURCE_COLUMN_NAMES = ("source", "input", "document", "article", "question", "src")
TARGET_COLUMN_NAMES = ("target", "output", "summary", "highlights", "answer", "tgt")


# --------------------------------------------------------------------------------------------------------------
# Forget specification
# --------------------------------------------------------------------------------------------------------------


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
    if task == "seq2seq-lm":
        source, target = (
            _pick_column(
                f"{what}_column",
                getattr(data_args, f"{what}_column"),
                dataset,
                [c for c in names if c in dataset.features],
                what,
            )
            for what, names in (("source", SOURCE_COLUMN_NAMES), ("target", TARGET_COLUMN_NAMES))
        )
        return Columns(label=None, text=source, target=target)
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


# Models whose learned positions start after the padding index (fairseq style): `max_position_embeddings` counts
# `pad_token_id + 1` positions that no token can take.
_POSITIONS_AFTER_PADDING = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "mpnet"}
    | {"longformer", "ibert", "luke", "esm", "markuplm", "xmod"}
)


def model_position_limit(config: PretrainedConfig | None) -> int | None:
    """The most tokens one sequence can have for the model of `config`, from its position table; `None` where the
    config declares none (relative positions, T5 say)."""
    if config is None:
        return None
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            break
    else:
        return None
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return max(limit, 1)


def prepare_unlearning_data(
    data_args: DataArguments, splits: DatasetDict, task: str, model_config: PretrainedConfig, processor, seed: int
) -> UnlearningData:
    """Resolve columns, labels and the forget set; split the training data into forget and retain.

    Args:
        data_args: the data arguments (forget spec, splits, columns, lengths).
        splits: every split of the dataset.
        task: `text-classification`, `image-classification`, `causal-lm` or `seq2seq-lm`.
        model_config: the model's config, for its labels (and image channels).
        processor: the tokenizer or image processor the collator applies at batch time.
        seed: seed of `random:` forget specs.

    Returns:
        The forget, retain and held-out datasets (only the needed columns), the selection, the collator and a
        record of the data's identity (names, splits, fingerprints, row counts) for the reports.
    """
    train = splits[data_args.train_split]
    columns = resolve_columns(train, data_args, task)
    needed = [c for c in (columns.text, columns.text_pair, columns.image, columns.label, columns.target) if c]
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
        # positions beyond the model's would fail, whatever the tokenizer declares (many declare no limit at all)
        limit = model_position_limit(model_config)
        if limit is not None:
            max_length = min(max_length, limit)
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
