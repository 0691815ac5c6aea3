"""Collators (classification and causal LM), the columns they read, and the seeded loaders built on them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PretrainedConfig

from ..errors import DeepCleanError


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
    """The batch-time collator of `task`: classification inputs and class ids, causal-LM token labels, or a
    sequence-to-sequence model's source tokens and target labels."""
    if task == "causal-lm":
        return CausalLMCollator(processor, columns.text, max_length)
    if task == "seq2seq-lm":
        return Seq2SeqCollator(processor, columns.text, columns.target, max_length)
    image_mode = "L" if getattr(model_config, "num_channels", 3) == 1 else "RGB"
    return ClassificationCollator(processor, columns, label_map, max_length, image_mode=image_mode)


class CausalLMCollator:
    """Tokenise texts at batch time: truncation to `max_length`, right padding, labels -100 on padding.

    The pad id is the tokenizer's pad token, else its end-of-sequence token (GPT-2 and Llama tokenizers have no
    pad token). Padding positions have attention mask 0 and label -100, so the pad id itself never matters.
    Padding is done here, on the right, whatever the tokenizer's `padding_side`: the Fisher engine skips trailing
    padding, and positions then match between a sequence alone and in a batch.
    """

    def __init__(self, tokenizer, text_column: str, max_length: int | None = None):
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise DeepCleanError(
                "--model_name_or_path: the tokenizer has neither a pad nor an end-of-sequence token; expected one of "
                "them for padding causal-LM batches."
            )
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.max_length = max_length
        self.pad_id = int(pad_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [row[self.text_column] for row in rows]
        encoded = self.tokenizer(texts, truncation=self.max_length is not None, max_length=self.max_length)
        input_ids, attention_mask = _right_padded(encoded["input_ids"], self.pad_id)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Seq2SeqCollator:
    """Tokenise source and target texts at batch time for an encoder-decoder: sources as `input_ids` and
    `attention_mask`, targets as `labels` (-100 on padding), both truncated to `max_length` and padded on the right.
    The model builds its decoder inputs from the labels (`prepare_decoder_input_ids_from_labels`), so one sample's
    log-likelihood is the sum over its target tokens."""

    def __init__(self, tokenizer, source_column: str, target_column: str, max_length: int | None = None):
        if tokenizer.pad_token_id is None:
            raise DeepCleanError(
                "--model_name_or_path: the tokenizer has no pad token; expected one for padding sequence-to-sequence "
                "batches."
            )
        self.tokenizer = tokenizer
        self.source_column = source_column
        self.target_column = target_column
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        truncate = {"truncation": self.max_length is not None, "max_length": self.max_length}
        sources = self.tokenizer([row[self.source_column] for row in rows], **truncate)["input_ids"]
        targets = self.tokenizer(text_target=[row[self.target_column] for row in rows], **truncate)["input_ids"]
        input_ids, attention_mask = _right_padded(sources, int(self.tokenizer.pad_token_id))
        target_ids, target_mask = _right_padded(targets, int(self.tokenizer.pad_token_id))
        labels = target_ids.masked_fill(target_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, mask)` of token sequences padded on the right to the longest one (at least one position)."""
    width = max(1, max(len(ids) for ids in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for n, sequence in enumerate(sequences):
        ids[n, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[n, : len(sequence)] = 1
    return ids, mask


@dataclass(frozen=True)
class Columns:
    label: str | None  # None for language models, which learn text itself
    text: str | None = None  # the text, or a sequence-to-sequence model's source
    text_pair: str | None = None
    image: str | None = None
    target: str | None = None  # a sequence-to-sequence model's target text
