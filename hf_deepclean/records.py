"""Typed records of an unlearning run, and the metric names every report shares.

An output folder's `deepclean_config.json` is `RunRecord.to_dict()` and its `deepclean_results.json` is
`UnlearningResults.to_dict()`; `from_dict` reads either back, so the model card and `hf-deepclean push` work from
a folder's files alone. Reports hold counts, hashes, settings and metrics: never rows of the forget set.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any


ACCURACY_METRICS = ("forget_accuracy", "retain_accuracy", "test_accuracy")
# what `avg_gap` averages: percentage points to a reference (retrained) model
GAP_METRICS = (*ACCURACY_METRICS, "mia_efficacy")
# the headline figures: benchmark and demo tables, commit messages
SUMMARY_METRICS = (*ACCURACY_METRICS, "mia_auc", "mia_efficacy")
# every figure the model card's results table may show, in its order
CARD_METRICS = (
    *ACCURACY_METRICS,
    "forget_loss",
    "retain_loss",
    "test_loss",
    "forget_perplexity",
    "retain_perplexity",
    "test_perplexity",
    "mia_auc",
    "mia_efficacy",
    "mia_min_k_auc",
    "canary_exposure",
    "canary_exposure_unseen",
)
# the stages whose time is the unlearning itself (not loading, evaluating or saving)
UNLEARNING_STAGES = ("fisher_forget", "fisher_retain", "select_and_reset", "probe_learning_rate", "repair")


@dataclass
class StageTimer:
    """Wall-clock seconds per pipeline stage; `with timer("stage"): ...` adds to that stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def unlearning_seconds(self) -> float:
        """The time of the unlearning stages, without loading, evaluation and saving."""
        return sum(self.seconds.get(stage, 0.0) for stage in UNLEARNING_STAGES)


@dataclass
class ResetCount:
    """How many elements of a tensor (or of the whole scope) were reset."""

    reset: int
    numel: int

    @property
    def share(self) -> float:
        return self.reset / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"reset": self.reset, "numel": self.numel, "share": self.share}


@dataclass
class ResetStatistics:
    """Reset counts over the whole scope and per parameter."""

    total: ResetCount
    per_parameter: dict[str, ResetCount]

    def per_module(self) -> dict[str, float]:
        """Share of elements reset per module (a parameter's name without its last part)."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, count in self.per_parameter.items():
            module = name.rsplit(".", 1)[0] if "." in name else name
            counts[module][0] += count.reset
            counts[module][1] += count.numel
        return {module: reset / numel if numel else 0.0 for module, (reset, numel) in counts.items()}


@dataclass
class ResetRecord:
    """What was reset: the rule, the selection's fingerprint, counts, and what the weights were reset to."""

    mode: str
    selection_rule: str
    selection_sha256: str
    statistics: ResetStatistics
    # `--reset base`: the base model, and the selected parameters it lacks (they got freshly initialised values)
    base_model: str | None = None
    base_model_revision: str | None = None
    init_fallback: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"mode": self.mode}
        if self.mode == "base":
            record |= {
                "base_model": self.base_model,
                "base_model_revision": self.base_model_revision,
                "init_fallback": list(self.init_fallback),
            }
        return record | {
            "selection_rule": self.selection_rule,
            "selection_sha256": self.selection_sha256,
            "total": self.statistics.total.to_dict(),
            "per_parameter": {name: count.to_dict() for name, count in self.statistics.per_parameter.items()},
            "per_module": self.statistics.per_module(),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ResetRecord:
        def count(entry: Mapping[str, Any]) -> ResetCount:
            return ResetCount(int(entry["reset"]), int(entry["numel"]))

        per_parameter = dict(record["per_parameter"])
        # folders written by hf_deepclean 0.1.0.dev0 before the `total` key kept the total under `__total__`
        total = record["total"] if "total" in record else per_parameter.pop("__total__")
        return cls(
            mode=record["mode"],
            selection_rule=record["selection_rule"],
            selection_sha256=record["selection_sha256"],
            statistics=ResetStatistics(count(total), {name: count(entry) for name, entry in per_parameter.items()}),
            base_model=record.get("base_model"),
            base_model_revision=record.get("base_model_revision"),
            init_fallback=list(record.get("init_fallback") or []),
        )


@dataclass
class FisherRecord:
    """The Fisher passes: sample counts, where the retain sums came from, and the per-element state's memory."""

    forget_samples: int
    retain_samples: int
    retain_source: str  # "pass" (a pass over the retain rows) or "cache" (`--fisher_cache`)
    accumulator_bytes: dict[str, int]
    # `--fisher_check`: seconds, max_relative_error, worst_parameter, samples, and its share of the Fisher passes' time
    check: dict[str, Any] | None = None
    # parameters whose Fisher came from the exact per-sample path, with the reason, and those no sample used
    exact_path: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)


@dataclass
class RepairRecord:
    """The masked repair: steps taken (those of a probe trial it continued from included), last loss, whether early
    stopping ended it (and what its checks measured), and its learning rate."""

    steps: int
    final_loss: float | None
    stopped_early: bool
    learning_rate: float | None
    # `{rate: retain loss}` of each rate the probe's last sweep tried (empty, with 0 steps, when the reset did too
    # little damage for trials), its steps per trial, the retain loss before the trials and the original model's
    # before the reset, and the steps of the chosen rate's trial the repair continued from (0: none); None when the
    # rate was given
    learning_rate_probe: dict[str, float] | None = None
    learning_rate_probe_steps: int | None = None
    learning_rate_probe_start_loss: float | None = None
    learning_rate_probe_reference_loss: float | None = None
    learning_rate_probe_kept_steps: int | None = None
    # with early stopping: the retain accuracy (or perplexity) that counted as recovered, and every check the monitor
    # made (`step`, the retain figure it measured, `mia_auc` under `retain_and_mia`); None without it
    early_stopping_target: float | None = None
    early_stopping_checks: list[dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for key in [name for name in record if name.startswith(("learning_rate_probe", "early_stopping"))]:
            if record[key] is None:
                del record[key]
        return record


# the figures measured against a reference model (retrained without the forget rows), in the card's order
REFERENCE_METRICS = ("forget_quality", "model_utility", "privleak")


@dataclass
class ReferenceRecord:
    """The model a run was compared with (`--reference_model`, a model retrained without the forget rows), and what
    the comparison gave.

    `metrics` holds the reference's own figures (those of `metrics_before`, and its `model_utility`); `before` and
    `after` those of the original and of the cleaned model against it: `forget_quality` (the KS p-value of TOFU) and
    `ks_statistic`, `model_utility` and its three numbers on retain questions, `privleak` (MUSE) with
    `auc_unlearned` and `auc_retrain`. `not_measured` says, per figure left out, why; `rows` how many questions
    and sequences each figure read.
    """

    model: str
    revision: str
    metrics: dict[str, float] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ReferenceRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


@dataclass
class UnlearningResults:
    """Everything a run measured and did; `deepclean_results.json` is its `to_dict()`."""

    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    reset: ResetRecord
    fisher: FisherRecord
    repair: RepairRecord
    timings: dict[str, float]
    ratio_histogram: dict[str, Any]
    loss_histograms: dict[str, Any]
    evaluated_rows: dict[str, int]
    # the cleaned model lost more accuracy than `--max_accuracy_drop` allows: what fell, for the log and the card
    warnings: list[str] = field(default_factory=list)
    # `--reference_model`: the reference and what the comparison with it gave; None without one
    reference: ReferenceRecord | None = None
    hub_commit_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record = {
            "metrics": {"before": self.metrics_before, "after": self.metrics_after},
            "reset": self.reset.to_dict(),
            "fisher": asdict(self.fisher),
            "repair": self.repair.to_dict(),
            "timings": self.timings,
            "ratio_histogram": self.ratio_histogram,
            "loss_histograms": self.loss_histograms,
            "evaluated_rows": self.evaluated_rows,
            "warnings": list(self.warnings),
        }
        if self.reference is not None:
            record["reference"] = self.reference.to_dict()
        if self.hub_commit_url is not None:
            record["hub_commit_url"] = self.hub_commit_url
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> UnlearningResults:
        return cls(
            metrics_before=dict(record["metrics"]["before"]),
            metrics_after=dict(record["metrics"]["after"]),
            reset=ResetRecord.from_dict(record["reset"]),
            fisher=FisherRecord(**record["fisher"]),
            repair=RepairRecord(**record["repair"]),
            timings=dict(record["timings"]),
            ratio_histogram=dict(record.get("ratio_histogram") or {}),
            loss_histograms=dict(record.get("loss_histograms") or {}),
            evaluated_rows=dict(record.get("evaluated_rows") or {}),
            warnings=list(record.get("warnings") or []),
            reference=ReferenceRecord.from_dict(record["reference"]) if record.get("reference") else None,
            hub_commit_url=record.get("hub_commit_url"),
        )


@dataclass
class ForgetRecord:
    """The forget set as the reports name it: a count and a hash of its row identifiers, never its content."""

    kind: str
    split: str
    num_rows: int
    sha256: str
    hash_of: str = "split name, then the sorted row indices, one per line"


@dataclass
class ModelRecord:
    name_or_path: str
    revision: str
    task: str
    architecture: str


@dataclass
class RunRecord:
    """How a run was set up; `deepclean_config.json` is its `to_dict()`.

    `arguments` maps every argument's flag name to its value (the forget specification redacted to its kind);
    `dataset` records the data's identity (names, splits, fingerprints, row counts, columns); `sharding` is `fsdp2`
    when the weights were sharded across the processes, else `none` (whole weights on every process).
    """

    arguments: dict[str, Any]
    model: ModelRecord
    dataset: dict[str, Any]
    forget: ForgetRecord
    seed: int
    num_processes: int
    library_versions: dict[str, str]
    canaries: dict[str, Any] | None = None
    method: str = "DeepClean (arXiv 2311.10448)"
    sharding: str = "none"

    def to_dict(self) -> dict[str, Any]:
        record = {
            "hf_deepclean_method": self.method,
            "arguments": self.arguments,
            "model": asdict(self.model),
            "dataset": self.dataset,
        }
        if self.canaries is not None:
            record["canaries"] = self.canaries
        return record | {
            "forget": asdict(self.forget),
            "seed": self.seed,
            "num_processes": self.num_processes,
            "sharding": self.sharding,
            "library_versions": self.library_versions,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RunRecord:
        known = {f.name for f in fields(ForgetRecord)}
        return cls(
            arguments=dict(record["arguments"]),
            model=ModelRecord(**record["model"]),
            dataset=dict(record["dataset"]),
            forget=ForgetRecord(**{k: v for k, v in record["forget"].items() if k in known}),
            seed=record["seed"],
            num_processes=record["num_processes"],
            library_versions=dict(record["library_versions"]),
            canaries=record.get("canaries"),
            method=record.get("hf_deepclean_method", cls.method),
            sharding=record.get("sharding", "none"),
        )


def _json_ready(value: Any) -> Any:
    """Plain JSON values: records become dicts, tensors lists, non-finite floats `null` (strict parsers reject NaN)."""
    if hasattr(value, "to_dict"):
        return _json_ready(value.to_dict())
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy arrays
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_json(value: Any) -> str:
    """Strict JSON text of a report record (a record object or plain values)."""
    return json.dumps(_json_ready(value), indent=2, allow_nan=False) + "\n"
