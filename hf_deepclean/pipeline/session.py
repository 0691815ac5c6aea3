"""A loaded session: the model, its processor, the data split into forget / retain / held-out rows, and the
Accelerator, loaded once and shared by `unlearn`, `fisher` and `evaluate`."""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from datasets import Dataset, DatasetDict, Image
from torch import nn
from transformers import PretrainedConfig

from ..config import GENERATIVE_TASKS, DataArguments, ModelArguments
from ..data.canaries import Canaries, load_canaries
from ..data.collators import make_dataloader, subsample
from ..data.forget import parse_forget_spec
from ..data.loading import UnlearningData, load_dataset_splits, prepare_unlearning_data
from ..distributed import check_parallelism, default_accelerator, sharding_plan
from ..errors import DeepCleanError
from ..evaluation.causal_lm import evaluate_causal_lm
from ..evaluation.lm_attacks import QA_COLUMNS, is_question_row
from ..evaluation.metrics import evaluate_unlearning
from ..modeling import (
    declared_base_model,
    infer_task,
    load_adapter,
    load_base_model_config,
    load_base_values,
    load_model,
    load_model_config,
    load_processor,
)
from ..sharding import shard_model
from .deepclean import UnlearningRows


logger = get_logger(__name__)

LIBRARIES = ("hf_deepclean", "torch", "transformers", "datasets", "accelerate", "huggingface_hub", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class DeepCleanSession:
    """A model and its data, loaded as every command loads them.

    Attributes:
        model_args: which model was loaded.
        data_args: its data and the forget specification.
        accelerator: the run's Accelerator (data parallel only).
        model: the model, prepared by the accelerator for evaluation (every process holds all of it).
        processor: its tokenizer or image processor.
        task: `text-classification`, `image-classification`, `causal-lm` or `seq2seq-lm`.
        data: forget, retain and held-out rows, the forget selection, the collator and the data's identity.
        train_split: the whole training split.
        canaries: `--canaries` of a causal LM, or None.
        seed: seed of `random:` forget specifications, subsampling and shuffling.
        batch_size: per-process batch size of every pass.
        monitor_rows: held-out rows set aside for the repair's early-stopping check (`reserve_monitor_rows`), never
            part of the reported held-out figures.
        questions: a causal LM's TOFU-style question columns (`QA_COLUMNS`) of the forget and retain rows, in their
            order, when the data has them; what forget quality and model utility read (`question_rows`).
    """

    model_args: ModelArguments
    data_args: DataArguments
    accelerator: Accelerator
    model: nn.Module
    processor: Any
    task: str
    data: UnlearningData
    train_split: Dataset
    canaries: Canaries | None
    seed: int
    batch_size: int
    monitor_rows: Dataset | None = None
    questions: dict[str, Dataset] | None = None

    @classmethod
    def load(
        cls,
        model_args: ModelArguments,
        data_args: DataArguments,
        *,
        seed: int,
        batch_size: int,
        accelerator: Accelerator | None = None,
    ) -> DeepCleanSession:
        """Load the model, its processor and the data; resolve the forget set.

        Args:
            model_args: the model (and adapter) to load.
            data_args: its data and the forget specification (None: every training row is retained).
            seed: seed of `random:` forget specifications and of subsampling.
            batch_size: per-process batch size.
            accelerator: an existing Accelerator (`default_accelerator()` otherwise); under FSDP version 2 the
                model is sharded (`prepare_for_evaluation`); DeepSpeed and tensor parallelism are refused.
        """
        if data_args.forget is not None:
            parse_forget_spec(data_args.forget)  # fail on a malformed spec before loading anything heavy
        accelerator = checked_accelerator(accelerator)
        # under several processes the first one downloads and fills the caches, then the others read them
        with accelerator.main_process_first(), raised_after_barrier(accelerator) as failure:
            model_config = load_model_config(model_args)
            splits = load_dataset_splits(data_args)
            train = splits[data_args.train_split]
            has_image = data_args.image_column is not None or any(
                isinstance(feature, Image) for feature in train.features.values()
            )
            task = infer_task(model_config, model_args.task, has_image_column=has_image)
            canaries = None
            if data_args.canaries is not None:
                if task != "causal-lm":
                    raise DeepCleanError(f"--canaries: measures causal LMs; this model's task is {task!r}.")
                canaries = load_canaries(data_args.canaries)
            processor = load_processor(model_args, task)
            # data problems (columns, labels, the forget set) surface before the weights are loaded
            data = prepare_unlearning_data(data_args, splits, task, model_config, processor, seed=seed)
            model = load_adapter(load_model(model_args, task, model_config), model_args)
        if failure:
            raise failure[0]
        logger.info(
            f"Forget set: {data.selection.num_rows} rows of split {data.selection.split!r}; retain set: "
            f"{len(data.retain)} rows; held-out: {data.eval_split!r}.",
            main_process_only=True,
        )
        return cls(
            model_args=model_args,
            data_args=data_args,
            accelerator=accelerator,
            model=prepare_for_evaluation(model, accelerator),
            processor=processor,
            task=task,
            data=data,
            train_split=train,
            canaries=canaries,
            seed=seed,
            batch_size=batch_size,
            questions=question_columns(splits, data, data_args.train_split) if task == "causal-lm" else None,
        )

    def reserve_monitor_rows(self, count: int) -> None:
        """Move a seeded sample of `count` held-out rows (at most half of them) to `monitor_rows`: an early-stopping
        check that judges the attack on held-out rows must not pick its stopping point on the rows that are then
        reported."""
        test = self.data.test
        if test is None or self.monitor_rows is not None:
            return
        order = np.random.default_rng(self.seed).permutation(len(test))
        count = min(count, len(test) // 2)
        self.monitor_rows = test.select(sorted(order[:count].tolist()))
        self.data.test = test.select(sorted(order[count:].tolist()))
        logger.info(
            f"{count} held-out rows are kept for the early-stopping check and left out of the reported figures.",
            main_process_only=True,
        )

    def kept_class_rows(self) -> np.ndarray | None:
        """Which evaluated held-out rows (in evaluation order) have a label that some retain row still has; None
        without labels or held-out rows. A class whose every training row is forgotten is meant to be lost, so its
        held-out rows do not count as damage."""
        label, test = self.data.columns.label, self.data.test
        if label is None or test is None:
            return None
        kept = set(self.data.retain.unique(label))
        return np.array([value in kept for value in self.evaluated_rows("test")[label]], dtype=bool)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def rows(self) -> UnlearningRows:
        """The forget, retain and held-out rows as `run_deepclean` reads them."""
        return UnlearningRows(
            forget=self.data.forget,
            retain=self.data.retain,
            held_out=self.monitor_rows,
            collator=self.data.collator,
            batch_size=self.batch_size,
            seed=self.seed,
            max_retain_samples=self.data_args.max_retain_samples,
        )

    def dataloader(self, split: str, *, shuffle: bool = False, max_rows: int | None = None):
        """A plain DataLoader of the `forget`, `retain` or `test` rows (a seeded sample of at most `max_rows`)."""
        datasets = {"forget": self.data.forget, "retain": self.data.retain, "test": self.data.test}
        return self.rows().loader(datasets[split], shuffle=shuffle, max_rows=max_rows)

    def evaluated_rows(self, split: str) -> Dataset:
        """The rows of `split` every evaluation reads, in its order: all forget rows, a seeded sample of at most
        `--max_eval_samples` retain or held-out rows."""
        datasets = {"forget": self.data.forget, "retain": self.data.retain, "test": self.data.test}
        max_rows = None if split == "forget" else self.data_args.max_eval_samples
        return subsample(datasets[split], max_rows, self.seed)

    def question_rows(self) -> dict[str, list[dict]] | None:
        """The question rows TOFU's metrics read (`is_question_row`), or None without question columns: every one
        among the forget rows (`forget`), and among the evaluated retain rows a seeded sample of at most
        `UTILITY_QUESTIONS` (`retain`), as TOFU measures utility on 400 retain questions."""
        if self.questions is None:
            return None
        retain = subsample(self.questions["retain"], self.data_args.max_eval_samples, self.seed)  # evaluated rows
        rows = {
            split: [row for row in dataset if is_question_row(row)]
            for split, dataset in (("forget", self.questions["forget"]), ("retain", retain))
        }
        if len(rows["retain"]) > UTILITY_QUESTIONS:
            order = np.random.default_rng(self.seed).permutation(len(rows["retain"]))
            rows["retain"] = [rows["retain"][i] for i in sorted(order[:UTILITY_QUESTIONS].tolist())]
        return rows

    def evaluation_dataloaders(self) -> dict[str, Any]:
        """The loaders every evaluation reads: forget rows, (a sample of) retain and held-out rows, canaries."""
        splits = ["forget", "retain"] + (["test"] if self.data.test is not None else [])
        loaders = {split: self.rows().loader(self.evaluated_rows(split)) for split in splits}
        if self.canaries is not None:
            canaries = self.canaries.dataset(self.data.columns.text)
            loaders["canaries"] = make_dataloader(canaries, self.data.collator, self.batch_size)
        return loaders

    def evaluate(self, model: nn.Module | None = None, prefix: str = "", return_outputs: bool = False):
        """Metrics of `model` (default: the session's) on the forget, retain and held-out rows; with
        `return_outputs`, also the per-sample outputs (see `evaluate_unlearning`, `evaluate_causal_lm`)."""
        evaluate, extra = evaluate_unlearning, {}
        if self.task in GENERATIVE_TASKS:
            evaluate = evaluate_causal_lm
            extra = {"canaries": self.canaries, "min_k_fraction": self.data_args.min_k_fraction}
        return evaluate(
            model if model is not None else self.model,
            self.evaluation_dataloaders(),
            self.accelerator,
            prefix,
            return_outputs=return_outputs,
            **extra,
        )

    def load_model(self, model_args: ModelArguments) -> nn.Module:
        """Another model of the session's task (a reference, say), prepared for evaluation."""
        with self.accelerator.main_process_first(), raised_after_barrier(self.accelerator) as failure:
            model = load_model(model_args, self.task)
        if failure:
            raise failure[0]
        return prepare_for_evaluation(model, self.accelerator)

    def load_reference(self, name: str, revision: str) -> nn.Module:
        """`--reference_model` (a model retrained without the forget rows), loaded with the session's task and safety
        settings and prepared for evaluation; a model that does not load is refused naming --reference_model."""
        args = dataclasses.replace(
            self.model_args, model_name_or_path=name, revision=revision, task=self.task, adapter_name_or_path=None
        )
        try:
            return self.load_model(args)
        except DeepCleanError as error:  # the loader names --model_name_or_path, the flag of the model under test
            raise DeepCleanError(f"--reference_model: {str(error).split(': ', 1)[-1]}") from None

    def load_base_values(self, names: list[str], base_config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """The values of `--base_model_name_or_path` for the parameters `names` (on CPU), for `--reset base`."""
        with self.accelerator.main_process_first(), raised_after_barrier(self.accelerator) as failure:
            values = load_base_values(self.model_args, self.task, names, base_config)
        if failure:
            raise failure[0]
        return values


# TOFU measures model utility on 400 retain questions
UTILITY_QUESTIONS = 400


def question_columns(splits: DatasetDict, data: UnlearningData, train_split: str) -> dict[str, Dataset] | None:
    """The question columns (`QA_COLUMNS`) of the forget and retain rows, in the order of `data.forget` and
    `data.retain`; None when a split they come from lacks one of them."""
    selection, train = data.selection, splits[train_split]
    forget = splits[selection.split] if selection.is_separate_split else train
    if any(column not in dataset.column_names for dataset in (train, forget) for column in QA_COLUMNS):
        return None
    if selection.is_separate_split:
        return {"forget": forget.select_columns(QA_COLUMNS), "retain": train.select_columns(QA_COLUMNS)}
    chosen = set(selection.indices)
    retain = [i for i in range(len(train)) if i not in chosen]
    columns = train.select_columns(QA_COLUMNS)
    return {"forget": columns.select(selection.indices), "retain": columns.select(retain)}


def prepare_for_evaluation(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The model as every pass of the run uses it: under FSDP2 (`sharding_plan`) sharded block by block across the
    processes; otherwise whole on every process, prepared by Accelerate (a training wraps it for DDP)."""
    plan = sharding_plan(accelerator)
    if plan is None:
        return accelerator.prepare_model(model, evaluation_mode=True)
    if getattr(model, "peft_config", None) is not None:
        raise DeepCleanError(
            "--adapter_name_or_path: got an adapter under FSDP, which this version does not shard; expected a full "
            "model under FSDP, or the adapter run data parallel (its state is the adapter's size)."
        )
    return shard_model(
        model.to(accelerator.device),
        wrap=plan.wrap,
        reshard_after_forward=plan.reshard_after_forward,
        mixed_precision=plan.mixed_precision,
    )


def checked_accelerator(accelerator: Accelerator | None) -> Accelerator:
    """`accelerator` checked for a supported set-up (`check_parallelism`), or `default_accelerator()`."""
    if accelerator is None:
        return default_accelerator()
    check_parallelism(accelerator)
    return accelerator


def resolve_reset(
    reset: str, model_args: ModelArguments, accelerator: Accelerator
) -> tuple[str, ModelArguments, PretrainedConfig | None]:
    """The reset mode a run uses, the model arguments to load with, and for `base` the base model's config.

    `auto` becomes `base` when the base is known, from --base_model_name_or_path or from `base_model` in the model's
    card (then set as the base model), and `init` otherwise, or when an adapter is cleaned. A base that only the card
    names and that cannot be loaded falls back to `init` with a warning; one given explicitly must load. A missing
    or unusable base is refused before any work (its weights are read once the selection is known).
    """
    if reset == "auto":
        if model_args.adapter_name_or_path is not None:
            return "init", model_args, None
        if model_args.base_model_name_or_path is None:
            declared = declared_base_model(model_args)
            if declared is None:
                return "init", model_args, None
            candidate = dataclasses.replace(model_args, base_model_name_or_path=declared, base_model_revision="main")
            try:
                base_config = _base_model_config(candidate, accelerator)
            except DeepCleanError as error:
                logger.warning(
                    f"--reset auto: the model card names the base model {declared!r}, which could not be loaded "
                    f"({error}); the selected weights get fresh values (--reset init) instead.",
                    main_process_only=True,
                )
                return "init", model_args, None
            logger.info(f"--reset auto: resetting toward the base model {declared!r} named by the model card.")
            return "base", candidate, base_config
        reset = "base"
    if reset != "base":
        return reset, model_args, None
    if model_args.base_model_name_or_path is None:
        raise DeepCleanError(
            "--reset: got 'base', which needs --base_model_name_or_path (the model the fine-tuning started from); "
            "pass it, or use --reset init."
        )
    if model_args.adapter_name_or_path is not None:
        # peft freezes the base weights, so only adapter weights are ever in scope, and none of them is in a base
        raise DeepCleanError(
            "--reset: got 'base' with --adapter_name_or_path; only the adapter's weights are trainable and an "
            "adapter's base values are its initialisation, expected --reset init."
        )
    return "base", model_args, _base_model_config(model_args, accelerator)


def _base_model_config(model_args: ModelArguments, accelerator: Accelerator) -> PretrainedConfig:
    with accelerator.main_process_first(), raised_after_barrier(accelerator) as failure:
        base_config = load_base_model_config(model_args)
    if failure:
        raise failure[0]
    return base_config


@contextmanager
def raised_after_barrier(accelerator: Accelerator) -> Iterator[list[DeepCleanError]]:
    """Hold back a `DeepCleanError` of the main process inside `main_process_first()`, so that the barrier there
    completes: the other processes then meet the same error in their turn instead of a broken connection, and every
    process exits with the one-line error. The caller raises what the yielded list holds after the block."""
    failure: list[DeepCleanError] = []
    try:
        yield failure
    except DeepCleanError as error:
        if not accelerator.is_main_process:
            raise
        failure.append(error)
