"""`DeepCleanUnlearner.run()`: the whole pipeline, top to bottom.

load -> evaluate before -> Fisher(forget), Fisher(retain) -> select + reset -> repair -> evaluate after
-> save folder + card (with its plots) -> push to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast, set_seed
from datasets import Image
from torch import nn

from ..bench.baselines import TrainingSchedule
from ..config import DataArguments, DeepCleanConfig, ModelArguments, OutputArguments, arguments_to_dict
from ..data.canaries import Canaries, load_canaries
from ..data.collators import make_dataloader, subsample
from ..data.forget import ForgetSelection, parse_forget_spec, redact_forget_spec
from ..data.loading import UnlearningData, load_dataset_splits, prepare_unlearning_data
from ..distributed import check_data_parallel, default_accelerator
from ..errors import DeepCleanError, DeepCleanRunError
from ..evaluation.causal_lm import evaluate_causal_lm
from ..evaluation.metrics import evaluate_unlearning
from ..fisher.cache import (
    FisherCacheInfo,
    check_fisher_cache,
    load_fisher_sums,
    retain_sums_from_cache,
    save_fisher_sums,
    weights_fingerprint,
)
from ..fisher.engine import FisherDiagonal, accumulate_fisher_sums, accumulator_bytes, fisher_from_sums
from ..hub.model_card import module_reset_shares, save_model_card
from ..hub.output import CONFIG_NAME, RESULTS_NAME, atomic_output_dir, check_output_dir
from ..hub.plots import fisher_ratio_histogram, loss_histograms
from ..hub.push import check_hub_token, push_output_dir
from ..modeling import (
    get_parameters_in_scope,
    infer_task,
    load_adapter,
    load_base_model_config,
    load_base_values,
    load_model,
    load_model_config,
    load_processor,
    merge_adapter,
)
from ..unlearning.probe import PROBE_EVAL_ROWS, choose_repair_learning_rate
from ..unlearning.repair import RepairMonitor, build_repair_monitor, repair_selected_weights
from ..unlearning.reset import ResetMasks, reset_selected_weights
from ..unlearning.selection import compute_fisher_ratio, reset_statistics, select_weights_to_reset
from ..unlearning.training import optimizer_steps_per_epoch


logger = get_logger(__name__)

# a loss of retain accuracy (absolute) beyond which a run warns that the model was damaged
DAMAGE_WARNING = 0.05

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
class StageTimer:
    """Wall-clock seconds per pipeline stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class DeepCleanUnlearner:
    """Make a trained model forget rows of its training data with DeepClean.

    Args:
        config: the method's hyperparameters.
        model_args: which model to clean.
        data_args: its training data and the forget specification.
        output_args: output folder and seed.
        accelerator: an existing `Accelerator` (`default_accelerator()` otherwise). Set-ups that shard the weights
            (FSDP, DeepSpeed) are refused.

    The same run works on several processes (`torchrun`, `accelerate launch`): Fisher passes are sharded and reduced,
    the selection (kept as `masks` after `run()`) is the same on every process, the repair is data parallel, and
    only the main process writes and pushes.

    Example:
        ```python
        from hf_deepclean import DataArguments, DeepCleanConfig, DeepCleanUnlearner, ModelArguments, OutputArguments

        results = DeepCleanUnlearner(
            DeepCleanConfig(),
            ModelArguments("my-org/my-classifier"),
            DataArguments("my-org/my-data", forget="class:3"),
            OutputArguments("cleaned"),
        ).run()
        print(results["metrics"]["after"]["forget_accuracy"])
        ```
    """

    def __init__(
        self,
        config: DeepCleanConfig,
        model_args: ModelArguments,
        data_args: DataArguments,
        output_args: OutputArguments,
        accelerator: Accelerator | None = None,
    ):
        self.config = config
        self.model_args = model_args
        self.data_args = data_args
        self.output_args = output_args
        self.accelerator = accelerator
        self.model: nn.Module | None = None
        self.processor = None
        self.task: str | None = None
        self.data: UnlearningData | None = None
        self.train_split = None
        self.canaries: Canaries | None = None
        self._fisher_cache: tuple[FisherDiagonal, FisherCacheInfo] | None = None
        self.base_config = None  # config of --base_model_name_or_path (`--reset base`)
        self.masks: ResetMasks | None = None  # the elements `run()` selected and reset
        self.timer = StageTimer()

    # -- stages --------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, its processor and the data; resolve the forget set."""
        if self.data_args.forget is not None:
            parse_forget_spec(self.data_args.forget)  # fail on a malformed spec before loading anything heavy
        if self.output_args.merge_adapter and self.model_args.adapter_name_or_path is None:
            raise DeepCleanError("--merge_adapter: needs --adapter_name_or_path (there is no adapter to merge).")
        self.setup_accelerator()
        # under several processes the first one downloads and fills the caches, then the others read them
        with self.accelerator.main_process_first(), _raised_after_barrier(self.accelerator) as failure:
            model_config = load_model_config(self.model_args)
            splits = load_dataset_splits(self.data_args)
            train = self.train_split = splits[self.data_args.train_split]
            has_image = self.data_args.image_column is not None or any(
                isinstance(feature, Image) for feature in train.features.values()
            )
            self.task = infer_task(model_config, self.model_args.task, has_image_column=has_image)
            self.canaries = self.load_canaries()
            self.processor = load_processor(self.model_args, self.task)
            # data problems (columns, labels, the forget set) surface before the weights are loaded
            self.data = prepare_unlearning_data(
                self.data_args, splits, self.task, model_config, self.processor, seed=self.output_args.seed
            )
            model = load_adapter(load_model(self.model_args, self.task, model_config), self.model_args)
        if failure:
            raise failure[0]
        # every process holds the whole model (evaluation and Fisher passes); the repair wraps it for DDP
        self.model = self.accelerator.prepare_model(model, evaluation_mode=True)
        logger.info(
            f"Forget set: {self.data.selection.num_rows} rows of split {self.data.selection.split!r}; retain set: "
            f"{len(self.data.retain)} rows; held-out: {self.data.eval_split!r}.",
            main_process_only=True,
        )

    def setup_accelerator(self) -> Accelerator:
        """The run's Accelerator (`default_accelerator()` unless one was given), checked for a data-parallel set-up."""
        if self.accelerator is None:
            self.accelerator = default_accelerator()
        else:
            check_data_parallel(self.accelerator)
        return self.accelerator

    def load_canaries(self) -> Canaries | None:
        """Read `--canaries` (causal LMs only)."""
        if self.data_args.canaries is None:
            return None
        if self.task != "causal-lm":
            raise DeepCleanError(f"--canaries: measures causal LMs; this model's task is {self.task!r}.")
        return load_canaries(self.data_args.canaries)

    def dataloader(self, split: str, *, shuffle: bool = False, max_rows: int | None = None):
        datasets = {"forget": self.data.forget, "retain": self.data.retain, "test": self.data.test}
        dataset = subsample(datasets[split], max_rows, self.output_args.seed)
        return make_dataloader(
            dataset,
            self.data.collator,
            self.config.per_device_batch_size,
            shuffle=shuffle,
            seed=self.output_args.seed,
        )

    def sharded_dataloader(self, split: str, *, max_rows: int | None = None):
        """`dataloader(split)` prepared by Accelerate: under several processes each one iterates over its shard."""
        return self.accelerator.prepare_data_loader(self.dataloader(split, max_rows=max_rows))

    def evaluation_dataloaders(self) -> dict[str, Any]:
        loaders = {
            "forget": self.dataloader("forget"),
            "retain": self.dataloader("retain", max_rows=self.data_args.max_eval_samples),
        }
        if self.data.test is not None:
            loaders["test"] = self.dataloader("test", max_rows=self.data_args.max_eval_samples)
        if self.canaries is not None:
            canaries = self.canaries.dataset(self.data.columns.text)
            loaders["canaries"] = make_dataloader(canaries, self.data.collator, self.config.per_device_batch_size)
        return loaders

    def evaluate(self, model: nn.Module | None = None, prefix: str = "", return_outputs: bool = False):
        """Metrics of `model` (default: the model being cleaned) on the forget, retain and held-out splits; with
        `return_outputs`, also the per-sample outputs (see `evaluate_unlearning`, `evaluate_causal_lm`)."""
        evaluate, extra = evaluate_unlearning, {}
        if self.task == "causal-lm":
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

    def repair_monitor(self, steps_per_epoch: int) -> RepairMonitor:
        """Early stopping of the repair (`--early_stopping`); build it before the reset, as its recovery target is
        the current model's retain accuracy."""
        if self.data.test is None:
            raise DeepCleanError("--early_stopping: needs a held-out split (--eval_split); the dataset has none.")
        if self.task == "causal-lm":
            raise DeepCleanError("--early_stopping: watches classification accuracy; causal LMs are not supported.")
        return build_repair_monitor(
            self.model,
            original_model=self.model,
            rows={"forget": self.data.forget, "retain": self.data.retain, "test": self.data.test},
            loader=lambda rows: make_dataloader(rows, self.data.collator, self.config.per_device_batch_size),
            accelerator=self.accelerator,
            tolerance=self.config.early_stopping_tolerance,
            criterion=self.config.early_stopping_criterion,
            steps_per_epoch=steps_per_epoch,
            seed=self.output_args.seed,
        )

    # -- pipeline ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the pipeline and write the output folder.

        Returns:
            The results record (also written as `deepclean_results.json`): metrics before/after, reset
            statistics, Fisher sample counts, repair summary and timings.
        """
        check_output_dir(self.output_args.output_dir, self.output_args.overwrite_output_dir)
        if self.output_args.push_to_hub:
            check_hub_token()
        self.setup_accelerator()
        set_seed(self.output_args.seed)
        method = self.config
        timer = self.timer

        with timer("load"):
            self.check_base_model()
            self.load()
            if method.fisher_cache is not None:
                self.load_fisher_cache()  # a stale cache is refused before any work
        unwrapped = self.accelerator.unwrap_model(self.model)
        params = get_parameters_in_scope(unwrapped, method.scope)  # an empty scope is refused before any work
        with timer("evaluate_before"):
            metrics_before, outputs_before = self.evaluate(prefix="before ", return_outputs=True)
        fisher, fisher_record = self.compute_fisher(params)
        repair_loader = self.dataloader("retain", shuffle=True)
        # built before the reset: the recovery target is the original model's retain accuracy
        monitor = (
            self.repair_monitor(optimizer_steps_per_epoch(repair_loader, self.accelerator))
            if method.early_stopping
            else None
        )
        with timer("select_and_reset"):
            ratios = compute_fisher_ratio(fisher["forget"], fisher["retain"], method.eps)
            masks = self.masks = self.select(ratios)
        base_values = None
        if method.reset == "base":
            with timer("load_base"):
                base_values = self.load_base_values(masks)
        with timer("select_and_reset"):
            # the same seed on every process: the same fresh values everywhere
            init_fallback = reset_selected_weights(
                unwrapped, masks, reset=method.reset, seed=self.output_args.seed, base_values=base_values
            )
        del base_values
        stats = reset_statistics(masks)
        ratio_histogram = fisher_ratio_histogram(ratios, masks)  # a compact summary for the card; ratios are freed
        del ratios
        logger.info(
            f"Reset {stats['__total__']['reset']} of {stats['__total__']['numel']} weights "
            f"({stats['__total__']['share']:.2%}).",
            main_process_only=True,
        )
        with timer("probe_learning_rate"):
            learning_rate, probe = choose_repair_learning_rate(
                method,
                self.model,
                self.dataloader("retain", shuffle=True),
                self.dataloader("retain", max_rows=PROBE_EVAL_ROWS),
                self.accelerator,
                masks,
            )
        with timer("repair"):
            repair = repair_selected_weights(
                self.model,
                masks,
                repair_loader,
                self.accelerator,
                **TrainingSchedule.repair_budget(
                    method, method.per_device_batch_size, learning_rate
                ).optimizer_arguments(),
                should_stop=monitor,
            )
        repair["learning_rate"] = learning_rate
        if probe is not None:
            repair["learning_rate_probe"] = {f"{rate:g}": loss for rate, loss in probe.items()}
        with timer("evaluate_after"):
            metrics_after, outputs_after = self.evaluate(prefix="after ", return_outputs=True)
        self.warn_if_damaged(metrics_before, metrics_after)
        timings = dict(timer.seconds)
        timings["unlearning"] = sum(
            timings.get(stage, 0.0)
            for stage in ("fisher_forget", "fisher_retain", "select_and_reset", "probe_learning_rate", "repair")
        )
        results = {
            "metrics": {"before": metrics_before, "after": metrics_after},
            "reset": {
                "mode": method.reset,
                **(self.base_record(init_fallback) if method.reset == "base" else {}),
                "selection_rule": method.selection_rule,
                "selection_sha256": selection_fingerprint(masks),
                "per_parameter": stats,
                "per_module": module_reset_shares({k: v for k, v in stats.items() if k != "__total__"}),
            },
            "fisher": fisher_record,
            "repair": repair,
            "timings": timings,
            "ratio_histogram": ratio_histogram,
            "loss_histograms": loss_histograms({"before": outputs_before, "after": outputs_after}),
            # each row once, whatever the number of processes (`gather_for_metrics` drops Accelerate's repeats)
            "evaluated_rows": {split: len(values["loss"]) for split, values in outputs_after.items()},
        }
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with timer("save"):
                self.save(results)
            results["timings"]["save"] = timer.seconds["save"]
            if self.output_args.push_to_hub:
                commit = push_output_dir(
                    self.output_args.output_dir,
                    self.output_args.hub_model_id,
                    private=self.output_args.hub_private_repo,
                    revision=self.output_args.hub_revision,
                )
                results["hub_commit_url"] = commit.commit_url
        return results

    def warn_if_damaged(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Warn when the cleaned model lost more than `DAMAGE_WARNING` of its retain accuracy, and say what helps."""
        if "retain_accuracy" not in after or before["retain_accuracy"] - after["retain_accuracy"] <= DAMAGE_WARNING:
            return
        hint = (
            "for a fine-tuned pretrained model, use --preset finetuned --base_model_name_or_path BASE (--reset base: "
            "the selected weights go back to the pretrained ones)"
            if self.config.reset != "base"
            else "try a smaller --reset_fraction or more --repair_epochs"
        )
        logger.warning(
            f"Retain accuracy fell from {before['retain_accuracy']:.3f} to {after['retain_accuracy']:.3f}: the repair "
            f"did not rebuild what the reset removed; {hint}.",
            main_process_only=True,
        )

    def check_base_model(self) -> None:
        """`--reset base`: refuse a missing or unusable `--base_model_name_or_path` before any work (its config is
        read now, its weights only once the selection is known)."""
        if self.config.reset != "base":
            return
        if self.model_args.base_model_name_or_path is None:
            raise DeepCleanError(
                "--reset: got 'base', which needs --base_model_name_or_path (the model the fine-tuning started from); "
                "pass it, or use --reset init."
            )
        if self.model_args.adapter_name_or_path is not None:
            # peft freezes the base weights, so only adapter weights are ever in scope, and none of them is in a base
            raise DeepCleanError(
                "--reset: got 'base' with --adapter_name_or_path; only the adapter's weights are trainable and an "
                "adapter's base values are its initialisation, expected --reset init."
            )
        with self.accelerator.main_process_first(), _raised_after_barrier(self.accelerator) as failure:
            self.base_config = load_base_model_config(self.model_args)
        if failure:
            raise failure[0]

    def select(self, ratios: FisherDiagonal) -> ResetMasks:
        """The elements to reset (`select_weights_to_reset` with this run's settings), the same on every process.

        The ratios come from reduced sums, which every process receives identically; the masks are still
        broadcast from the main process, so that the selection, the reset and the repair act on the very same
        elements everywhere even if a device computed a ratio differently in its last bit.
        """
        method = self.config
        masks = select_weights_to_reset(
            ratios,
            gamma=method.gamma,
            reset_fraction=method.reset_fraction,
            max_reset_fraction=method.max_reset_fraction,
            selection_scope=method.selection_scope,
        )
        if self.accelerator.num_processes > 1:
            # as bytes: not every backend reduces or broadcasts bool tensors
            shared = broadcast({name: mask.to(torch.uint8) for name, mask in masks.items()}, from_process=0)
            masks = {name: shared[name].bool() for name in masks}
        return masks

    def load_base_values(self, masks: ResetMasks) -> dict[str, torch.Tensor]:
        """The values of `--base_model_name_or_path` for the selected parameters (on CPU), for `--reset base`."""
        names = [name for name, mask in masks.items() if bool(mask.any())]
        with self.accelerator.main_process_first(), _raised_after_barrier(self.accelerator) as failure:
            values = load_base_values(self.model_args, self.task, names, self.base_config)
        if failure:
            raise failure[0]
        return values

    def base_record(self, init_fallback: list[str]) -> dict[str, Any]:
        """What the results record says of `--reset base`: the base model, and the selected parameters that it
        lacks and that got freshly initialised values instead."""
        return {
            "base_model": self.model_args.base_model_name_or_path,
            "base_model_revision": self.model_args.base_model_revision,
            "init_fallback": init_fallback,
        }

    def compute_fisher(self, params: dict[str, nn.Parameter]) -> tuple[dict[str, FisherDiagonal], dict[str, Any]]:
        """Fisher diagonals of the forget and retain sets (timed as `fisher_forget`, `fisher_retain`).

        With `fisher_cache`, the retain Fisher comes from the cached sums over the whole training split:
        `(S_all - S_forget) / (N - N_forget)`, at the cost of the forget pass only.

        Returns:
            `({"forget": F_forget, "retain": F_retain}, record)`, the record holding sample counts and the source.
        """
        method = self.config
        options = self._fisher_options(params)
        if method.fisher_cache is not None:
            with self.timer("fisher_retain"):
                cached_sums, cached = self.load_fisher_cache()
        with self.timer("fisher_forget"):
            # prepared loaders: each process sums over its shard, the engine reduces once
            forget_sums, forget_count = accumulate_fisher_sums(
                self.model, self.sharded_dataloader("forget"), desc="Fisher forget", **options
            )
        with self.timer("fisher_retain"):
            if method.fisher_cache is not None:
                if self.data.selection.is_separate_split:  # the forget rows are not part of the cached split
                    retain_sums, retain_count = cached_sums, cached.count
                else:
                    retain_sums, retain_count = retain_sums_from_cache(
                        cached_sums, cached.count, forget_sums, forget_count
                    )
            else:
                loader = self.sharded_dataloader("retain", max_rows=self.data_args.max_retain_samples)
                retain_sums, retain_count = accumulate_fisher_sums(self.model, loader, desc="Fisher retain", **options)
        fisher = {
            "forget": fisher_from_sums(forget_sums, forget_count, "Fisher forget"),
            "retain": fisher_from_sums(retain_sums, retain_count, "Fisher retain"),
        }
        record = {
            "forget_samples": forget_count,
            "retain_samples": retain_count,
            "retain_source": "cache" if method.fisher_cache is not None else "pass",
            "accumulator_bytes": accumulator_bytes(params),
        }
        return fisher, record

    def _fisher_options(self, params: dict[str, nn.Parameter]) -> dict[str, Any]:
        """The `accumulate_fisher_sums` settings of this run."""
        return {
            "params": params,
            "fisher_type": self.config.fisher_type,
            "accelerator": self.accelerator,
            "seed": self.output_args.seed,
            "chunk_memory_mb": self.config.fisher_chunk_memory_mb,
        }

    def load_fisher_cache(self) -> tuple[FisherDiagonal, FisherCacheInfo]:
        """Read `--fisher_cache` and refuse it unless it covers this model's weights and whole training split."""
        if self._fisher_cache is None:
            path = self.config.fisher_cache
            sums, info = load_fisher_sums(path)
            check_fisher_cache(info, self.fisher_cache_info(None, len(self.train_split)), path)
            self._fisher_cache = sums, info
        return self._fisher_cache

    def fisher_cache_info(self, indices: list[int] | None, count: int) -> FisherCacheInfo:
        """What a Fisher cache of this model over `indices` of the training split (all rows if None) is keyed by."""
        split = self.data_args.train_split
        rows = ForgetSelection("cache", split, list(range(len(self.train_split))) if indices is None else indices)
        return FisherCacheInfo(
            weights_sha256=weights_fingerprint(self.accelerator.unwrap_model(self.model)),
            dataset_fingerprint=self.train_split._fingerprint,
            split=split,
            rows_sha256=rows.sha256,
            num_rows=len(self.train_split),
            count=count,
            fisher_type=self.config.fisher_type,
            scope=self.config.scope,
        )

    def write_fisher_cache(self, path: str, overwrite: bool = False) -> FisherCacheInfo:
        """Compute the Fisher sums over the training split (or the rows of `--forget`) and save them to `path`.

        Returns:
            The cache's description (also stored in the file's metadata).
        """
        if Path(path).exists() and not overwrite:
            raise DeepCleanError(
                f"--fisher_output: {path!r} exists; pass --overwrite_output_dir to replace it, or choose another."
            )
        set_seed(self.output_args.seed)
        with self.timer("load"):
            self.load()
        unwrapped = self.accelerator.unwrap_model(self.model)
        params = get_parameters_in_scope(unwrapped, self.config.scope)
        rows = "retain" if self.data_args.forget is None else "forget"
        if rows == "forget" and self.data.selection.is_separate_split:
            raise DeepCleanError("--forget: `split:` specs name another split; a cache covers rows of --train_split.")
        with self.timer("fisher"):
            sums, count = accumulate_fisher_sums(
                self.model, self.sharded_dataloader(rows), desc="Fisher", **self._fisher_options(params)
            )
        fisher_from_sums(sums, count, "Fisher")  # refuses an empty or non-finite result
        info = self.fisher_cache_info(None if rows == "retain" else self.data.selection.indices, count)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_fisher_sums(path, sums, info, overwrite)
        return info

    # -- output --------------------------------------------------------------------------------------------------

    def config_record(self) -> dict[str, Any]:
        """What `deepclean_config.json` holds: every argument, versions, data identity, and the forget set as a
        count and a hash (never its content)."""
        arguments = arguments_to_dict(self.model_args, self.data_args, self.config, self.output_args)
        arguments["forget"] = redact_forget_spec(self.data_args.forget)
        selection = self.data.selection
        return {
            "hf_deepclean_method": "DeepClean (arXiv 2311.10448)",
            "arguments": arguments,
            "model": {
                "name_or_path": self.model_args.model_name_or_path,
                "revision": self.model_args.revision,
                "task": self.task,
                "architecture": type(self.accelerator.unwrap_model(self.model)).__name__,
            },
            "dataset": self.data.info,
            **({"canaries": self.canaries.record()} if self.canaries is not None else {}),
            "forget": {
                "kind": parse_forget_spec(self.data_args.forget).kind,
                "split": selection.split,
                "num_rows": selection.num_rows,
                "sha256": selection.sha256,
                "hash_of": "split name, then the sorted row indices, one per line",
            },
            "seed": self.output_args.seed,
            "num_processes": self.accelerator.num_processes,
            "library_versions": library_versions(),
        }

    def save(self, results: dict[str, Any]) -> Path:
        """Write model, processor, card and json reports to `output_dir`, atomically."""
        record = self.config_record()
        model = self.accelerator.unwrap_model(self.model)
        if self.output_args.merge_adapter:
            # merging rewrites the base layers in place: from here on the run's model is the merged one
            model = merge_adapter(model)
            self.model = model
        output_dir = self.output_args.output_dir
        try:
            with atomic_output_dir(output_dir, self.output_args.overwrite_output_dir) as staging:
                model.save_pretrained(staging)
                self.processor.save_pretrained(staging)
                (staging / CONFIG_NAME).write_text(to_json(record))
                (staging / RESULTS_NAME).write_text(to_json(results))
                save_model_card(staging, record, results)
        except OSError as error:  # a full disk, a folder removed under the run: the run failed, the input was fine
            raise DeepCleanRunError(
                f"--output_dir: could not write {output_dir!r} ({error.strerror or error}); nothing was written, "
                "expected a folder with room for the model."
            ) from error
        logger.info(f"Saved the cleaned model to {self.output_args.output_dir}", main_process_only=True)
        return Path(self.output_args.output_dir)


def selection_fingerprint(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a selection: parameter names in order, each followed by its mask's shape and elements as bytes.

    Two runs selected the very same elements exactly when their fingerprints agree.
    """
    digest = hashlib.sha256()
    for name, mask in masks.items():
        digest.update(f"{name}:{tuple(mask.shape)}\n".encode())
        digest.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _raised_after_barrier(accelerator: Accelerator) -> Iterator[list[DeepCleanError]]:
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


def _json_ready(value: Any) -> Any:
    """Plain JSON values: tensors become lists, non-finite floats `null` (strict parsers reject NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_json(value: Any) -> str:
    """Strict JSON text of a report record."""
    return json.dumps(_json_ready(value), indent=2, allow_nan=False) + "\n"
