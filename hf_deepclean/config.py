"""Argument dataclasses for `hf_deepclean`, shared by the CLI (`HfArgumentParser`) and the Python API.

`ModelArguments`, `DataArguments` and `OutputArguments` say *what* to clean and where to write it;
`DeepCleanConfig` holds the hyperparameters of the method itself (Fisher, selection, reset, repair), in the
way `peft.LoraConfig` holds those of LoRA. Every field is validated in `__post_init__` so that the Python API
and the CLI refuse the same bad values with the same one-line message.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import DeepCleanError
from .validation import check_choice, check_fraction, check_positive


TASKS = ("text-classification", "image-classification", "causal-lm", "seq2seq-lm")
# the tasks whose model generates text: no class accuracy, language-model metrics
GENERATIVE_TASKS = ("causal-lm", "seq2seq-lm")
SELECTION_SCOPES = ("global", "per_parameter", "per_layer")
SELECTION_WEIGHTINGS = ("none", "movement")
EARLY_STOPPING_CRITERIA = ("retain", "retain_and_mia")
FORGET_LOSSES = ("ascent", "simnpo")  # the forget term of the forget-ascent repair
# what selected elements become; `auto` is decided by the run (`base` when the base model is known, else `init`)
RESET_VALUES = ("init", "zero", "base")
# retain rows the retain Fisher pass reads by default: it barely moves the selection (docs/decisions.md, 2026-12-06)
DEFAULT_MAX_RETAIN_SAMPLES = 2048
RESET_MODES = ("auto", *RESET_VALUES)
# `datasets` builders that read local files given with --data_files (a --dataset_name, but never a Hub id)
FILE_BUILDERS = ("csv", "json", "parquet", "text")
# transformers schedules that need no arguments beyond warm-up and step counts
SCHEDULERS = tuple("linear cosine cosine_with_restarts polynomial constant constant_with_warmup inverse_sqrt".split())


@dataclass
class ModelArguments:
    """Which model to clean."""

    model_name_or_path: str = field(
        metadata={"help": "Hub model id (ORG/NAME) or path to a local `save_pretrained` folder."}
    )
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    task: str = field(
        default="auto",
        metadata={
            "help": "Model head: `text-classification`, `image-classification`, `causal-lm`, `seq2seq-lm` (T5, BART "
            "and other encoder-decoders), or `auto` (read from the model's config `architectures`, then from the "
            "dataset's columns).",
            "choices": ("auto", *TASKS),
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the model repository (off by default)."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Also load weights stored as pickle (`pytorch_model.bin`); off by default because unpickling a "
            "file can run code. Without it only safetensors weights load."
        },
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A peft adapter (Hub id or local folder) to load onto the model; see --scope adapter."},
    )
    adapter_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the adapter."})
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model the fine-tuning started from (Hub id or local folder), e.g. the pretrained encoder of "
            "a fine-tuned classifier; needed by --reset base, which puts the selected weights back to its values."
        },
    )
    base_model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the base model."})

    def __post_init__(self):
        if not isinstance(self.model_name_or_path, str) or not self.model_name_or_path.strip():
            raise DeepCleanError(
                f"--model_name_or_path: got {self.model_name_or_path!r}; expected a Hub id or a local folder."
            )
        if self.adapter_name_or_path is not None and not str(self.adapter_name_or_path).strip():
            raise DeepCleanError(
                f"--adapter_name_or_path: got {self.adapter_name_or_path!r}; expected a Hub id or a local folder."
            )
        if self.base_model_name_or_path is not None and not str(self.base_model_name_or_path).strip():
            raise DeepCleanError(
                f"--base_model_name_or_path: got {self.base_model_name_or_path!r}; expected a Hub id or a local folder."
            )
        check_choice("task", self.task, ("auto", *TASKS))


@dataclass
class DataArguments:
    """Which data the model was trained on, and which of it to forget."""

    forget_required: ClassVar[bool] = True

    dataset_name: str = field(
        metadata={
            "help": "Hub dataset id, a `Dataset.save_to_disk` folder, or a builder name (`csv`, `json`, `parquet`) "
            "used with --data_files."
        }
    )
    forget: str = field(
        metadata={
            "help": "Rows of the training split to forget: `split:NAME` | `indices:FILE` | `ids:COLUMN:FILE` | "
            "`where:COLUMN==VALUE` (also `!=`, ` in ` with a comma list) | `random:FRACTION` | `random:COUNT` | "
            "`class:LABEL`."
        }
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the dataset."})
    data_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Data files for a `csv`/`json`/`parquet` dataset: `PATH` (train split) or `SPLIT=PATH`, "
            "several allowed."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split the model was trained on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split for test metrics and the membership attack (default: `test`, else "
            "`validation`, when present)."
        },
    )
    text_column: str | None = field(default=None, metadata={"help": "Text column (auto-detected when unset)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for sentence pairs."})
    source_column: str | None = field(
        default=None,
        metadata={"help": "Sequence-to-sequence models: the input text column (auto-detected when unset)."},
    )
    target_column: str | None = field(
        default=None,
        metadata={"help": "Sequence-to-sequence models: the output text column (auto-detected when unset)."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected when unset)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected when unset)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate texts to this many tokens (default: the tokenizer's limit)."}
    )
    canaries: str | None = field(
        default=None,
        metadata={
            "help": 'Causal LMs: a JSON-lines file of canaries, `{"text": ..., "planted": true|false}` per line: '
            "secret strings planted in the training data and never-seen ones of the same format; their exposure "
            "(Carlini et al. 2019) is measured before and after. Reports hold counts and a hash, never the texts."
        },
    )
    min_k_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Causal LMs: the share k of a sequence's tokens whose lowest log-probabilities the Min-K%% Prob "
            "membership attack (`mia_min_k_auc`, Shi et al. 2023) averages."
        },
    )
    max_retain_samples: int | None = field(
        default=DEFAULT_MAX_RETAIN_SAMPLES,
        metadata={"help": "The retain Fisher pass reads a seeded sample of at most this many retain rows (0: all)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate retain and test metrics on a seeded subsample of at most this many rows."},
    )

    def __post_init__(self):
        if not isinstance(self.dataset_name, str) or not self.dataset_name.strip():
            raise DeepCleanError(
                f"--dataset_name: got {self.dataset_name!r}; expected a Hub id, a folder or csv/json/parquet."
            )
        if self.forget is None and not self.forget_required:
            pass  # `hf-deepclean fisher` over the whole training split
        elif not isinstance(self.forget, str) or not self.forget.strip():
            raise DeepCleanError(f"--forget: got {self.forget!r}; expected a forget specification such as random:0.1.")
        check_fraction("min_k_fraction", self.min_k_fraction)
        if self.max_retain_samples == 0 and not isinstance(self.max_retain_samples, bool):
            self.max_retain_samples = None  # every retain row
        for name in ("max_length", "max_retain_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                every = ", or 0 for every retain row" if name == "max_retain_samples" else ""
                raise DeepCleanError(f"--{name}: got {value!r}; expected a positive integer{every}.")


@dataclass
class DeepCleanConfig:
    """Hyperparameters of the DeepClean method (Fisher, selection, reset, repair).

    Selection resets the elements whose Fisher ratio `F_forget / (F_retain + eps)` is largest: either all with a
    ratio above `gamma`, or the top `reset_fraction` of the elements in scope. `max_reset_fraction` caps either.
    """

    fisher_type: str = field(
        default="empirical",
        metadata={
            "help": "`empirical`: gradients of the dataset labels' log-likelihood; `true`: expectation under the "
            "model's own predictive distribution.",
            "choices": ("empirical", "true"),
        },
    )
    scope: str = field(
        default="all",
        metadata={
            "help": "Parameters to compute, select and reset: `all` trainable parameters, or `adapter`: only the "
            "weights of the peft adapter (--adapter_name_or_path); base weights then stay unchanged.",
            "choices": ("all", "adapter"),
        },
    )
    fisher_chunk_memory_mb: float = field(
        default=256.0,
        metadata={
            "help": "Bound (MiB) on the per-sample gradients the Fisher engine holds at once for one layer (and on "
            "the per-sample stash of a tied parameter); lower it to save memory at some speed."
        },
    )
    fisher_check: bool = field(
        default=True,
        metadata={
            "help": "Before the forget set's Fisher pass, compare the engine with per-sample autograd on 4 samples of "
            "its first batch, for every parameter in scope; a mismatch (above 1e-4 relative, 3e-2 under mixed "
            "precision) stops the run with an error naming the parameter and its module."
        },
    )
    fisher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Fisher sums of the full training split written by `hf-deepclean fisher`: the retain Fisher is "
            "derived from it and one pass over the forget set, instead of a pass over the retain set."
        },
    )
    gamma: float | None = field(
        default=None,
        metadata={"help": "Reset elements with F_forget / (F_retain + eps) > gamma. Overrides --reset_fraction."},
    )
    # None: decided per model (`RESET_FRACTIONS` in pipeline/deepclean.py; docs/decisions.md, 2026-11-26 and 2026-12-07)
    reset_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Reset this share (0, 1] of the elements in scope with the largest Fisher ratio (default: 0.5; "
            "0.05 for language models)."
        },
    )
    max_reset_fraction: float = field(
        default=0.5,
        metadata={"help": "Never reset more than this share of the elements in scope (the top ones are kept)."},
    )
    eps: float = field(default=1e-12, metadata={"help": "Added to F_retain in the ratio's denominator."})
    reset: str = field(
        default="auto",
        metadata={
            "help": "`auto`: `base` when the model's base is known (--base_model_name_or_path, or `base_model` in "
            "its model card), else `init`; `init`: give selected elements freshly initialised values; `zero`: set "
            "them to zero (paper); `base`: give them the values of --base_model_name_or_path, the model the "
            "fine-tuning started from (parameters it lacks, such as a new head, get freshly initialised values).",
            "choices": RESET_MODES,
        },
    )
    # 4 rather than 2: on the digits benchmark it closed more of the gap on every scenario (docs/decisions.md, 2026-11-26)
    repair_epochs: float = field(
        default=4.0, metadata={"help": "Epochs of repair on the retain set (0 disables the repair)."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "AdamW learning rate of the repair. Default: chosen after the reset by a probe of 10 steps per "
            "candidate (3e-3, 1e-3, 3e-4, 1e-4, 3e-5, largest first) on retain rows: models trained from scratch "
            "take the larger rates, fine-tuned pretrained ones a smaller rate."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (acts on selected elements only)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of repair steps with linear warm-up."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Schedule of the repair learning rate.", "choices": SCHEDULERS}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the repair (0 disables)."})
    per_device_batch_size: int = field(
        default=32, metadata={"help": "Batch size per process for the Fisher passes, repair and evaluation."}
    )
    # per_parameter, not global: ahead on the mean of the digits tuning scenarios (docs/decisions.md, 2026-12-06)
    selection_scope: str = field(
        default="per_parameter",
        metadata={
            "help": "With --reset_fraction: rank elements over the whole model (`global`) or reset the top share of "
            "every parameter tensor (`per_parameter`) or layer (`per_layer`).",
            "choices": SELECTION_SCOPES,
        },
    )
    selection_weighting: str = field(
        default="none",
        metadata={
            "help": "`movement`: rank by Fisher ratio x |θ - θ_start|, θ_start the base model's values (needed).",
            "choices": SELECTION_WEIGHTINGS,
        },
    )
    min_movement_quantile: float = field(
        default=0.0,
        metadata={"help": "Select only elements whose |θ - θ_start| reaches this quantile of their tensor's."},
    )
    forget_ascent_weight: float = field(
        default=0.0, metadata={"help": "DeepClean with forget ascent: repair on L_retain + w forget term (w = this)."}
    )
    forget_loss: str = field(
        default="ascent",
        metadata={"help": "Forget term: `ascent` (-L_forget) or `simnpo` (SimNPO's loss).", "choices": FORGET_LOSSES},
    )
    base_reset_learning_rate: float | None = field(
        default=None, metadata={"help": "After a reset to a base model, repair at this rate instead of probing."}
    )
    early_stopping: bool | None = field(
        default=None,
        metadata={
            "help": "Stop the repair early once --early_stopping_criterion holds (checked 4 times per epoch on "
            "samples of 256 rows). Default: on for classifiers (retain accuracy), off for language models."
        },
    )
    early_stopping_criterion: str = field(
        default="retain",
        metadata={
            "help": "What ends the repair early: `retain` (retain accuracy recovered, or for a language model retain "
            "perplexity: repair no further than the original model) or `retain_and_mia` (also: a loss attack no "
            "longer tells forget rows from held-out rows; needs a held-out split, of which 256 rows are set aside for "
            "the check and left out of the reported figures).",
            "choices": EARLY_STOPPING_CRITERIA,
        },
    )
    # 0, not 0.01: stopping 1 point early closed less of the digits tuning gap (docs/decisions.md, 2026-12-06)
    early_stopping_tolerance: float = field(
        default=0.0,
        metadata={"help": "Retain accuracy counts as recovered within this distance of the original model's."},
    )
    early_stopping_perplexity_tolerance: float = field(
        default=0.02,
        metadata={"help": "LMs: retain perplexity counts as recovered up to this relative rise over the original's."},
    )
    max_accuracy_drop: float = field(
        default=0.02,
        metadata={"help": "Classifiers: warn in log and card when retain or held-out accuracy fell more than this."},
    )
    max_perplexity_rise: float = field(
        default=0.25,
        metadata={"help": "LMs: warn in log and card when retain or held-out perplexity rose more than this share."},
    )

    def __post_init__(self):
        check_choice("fisher_type", self.fisher_type, ("empirical", "true"))
        check_choice("scope", self.scope, ("all", "adapter"))
        if not (isinstance(self.fisher_chunk_memory_mb, int | float) and 0 < self.fisher_chunk_memory_mb < math.inf):
            raise DeepCleanError(
                f"--fisher_chunk_memory_mb: got {self.fisher_chunk_memory_mb!r}; expected a number of MiB > 0."
            )
        check_choice("reset", self.reset, RESET_MODES)
        if self.reset == "base" and self.scope == "adapter":
            raise DeepCleanError(
                "--reset: got 'base' with --scope adapter; an adapter's base values are its initialisation, expected "
                "--reset init."
            )
        check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        check_positive("gamma", self.gamma)
        check_fraction("reset_fraction", self.reset_fraction)
        check_fraction("max_reset_fraction", self.max_reset_fraction)
        check_positive("eps", self.eps)
        check_positive("repair_epochs", self.repair_epochs, allow_zero=True)
        check_positive("learning_rate", self.learning_rate)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        if not isinstance(self.warmup_ratio, (int, float)) or not (0.0 <= self.warmup_ratio < 1.0):
            raise DeepCleanError(f"--warmup_ratio: got {self.warmup_ratio!r}; expected a number in [0, 1).")
        if not isinstance(self.per_device_batch_size, int) or self.per_device_batch_size < 1:
            raise DeepCleanError(
                f"--per_device_batch_size: got {self.per_device_batch_size!r}; expected a positive integer."
            )
        check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        check_choice("selection_weighting", self.selection_weighting, SELECTION_WEIGHTINGS)
        if not (isinstance(self.min_movement_quantile, int | float) and 0 <= self.min_movement_quantile < 1):
            raise DeepCleanError(f"--min_movement_quantile: got {self.min_movement_quantile!r}; expected [0, 1).")
        check_positive("forget_ascent_weight", self.forget_ascent_weight, allow_zero=True)
        check_choice("forget_loss", self.forget_loss, FORGET_LOSSES)
        if self.forget_loss != "ascent" and not self.forget_ascent_weight:
            raise DeepCleanError(f"--forget_ascent_weight: got 0; expected > 0 with --forget_loss {self.forget_loss}.")
        check_positive("base_reset_learning_rate", self.base_reset_learning_rate)
        check_choice("early_stopping_criterion", self.early_stopping_criterion, EARLY_STOPPING_CRITERIA)
        for name in ("early_stopping_tolerance", "early_stopping_perplexity_tolerance"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.early_stopping is not None and not isinstance(self.early_stopping, bool):
            raise DeepCleanError(f"--early_stopping: got {self.early_stopping!r}; expected true or false.")
        check_fraction("max_accuracy_drop", self.max_accuracy_drop)
        check_positive("max_perplexity_rise", self.max_perplexity_rise)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeepCleanConfig:
        """A config from a named preset (`PRESETS`), with `overrides` on top.

        Args:
            name: `default` (this library's tuned defaults), `paper` (zero reset of the elements above a fixed
                ratio threshold, as in arXiv 2311.10448) or `finetuned` (reset to the pretrained values, repair
                until retain accuracy is back; needs `ModelArguments.base_model_name_or_path`).
            overrides: any other field.
        """
        return cls(**{**preset_values(name), **overrides})

    @property
    def selection_rule(self) -> str:
        """Human-readable selection rule, as recorded in the card."""
        if self.gamma is not None:
            return f"ratio > {self.gamma:g}"
        share = "a share decided per model" if self.reset_fraction is None else f"{self.reset_fraction:.4g}"
        return f"top {share} of elements by ratio"


# The paper fixes a threshold gamma on the Fisher ratio and zero-resets; it gives no value that carries over to
# other models, so the preset uses 10 (a forget-row Fisher ten times the retain one), capped like any run.
# `finetuned`: for a pretrained model fine-tuned on the data (pass --base_model_name_or_path): selected elements go back
# to the pretrained values, and the repair stops once retain accuracy is back to the fine-tuned model's, so that it
# does not train the retain rows past the fine-tuning (docs/decisions.md, 2026-11-27).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"reset": "zero", "gamma": 10.0, "reset_fraction": None, "early_stopping": False},
    "finetuned": {"reset": "base", "early_stopping": True, "early_stopping_criterion": "retain"},
}


def preset_values(name: str) -> dict[str, Any]:
    """The `DeepCleanConfig` fields a named preset sets (`--preset`); refuses an unknown name."""
    if name not in PRESETS:
        raise DeepCleanError(f"--preset: got {name!r}; expected one of {', '.join(PRESETS)}.")
    return dict(PRESETS[name])


@dataclass
class OutputArguments:
    """Where the cleaned checkpoint goes."""

    output_dir: str = field(metadata={"help": "Folder for the cleaned model, its card and the json reports."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing non-empty --output_dir (only once the run succeeded)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for sampling, initialisation and the repair."})
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "With --adapter_name_or_path: write the full model with the cleaned adapter merged into its "
            "weights (peft `merge_and_unload`) instead of the adapter folder."
        },
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the output folder to the Hub as --hub_model_id once it is written."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository to push to, `ORG/NAME` (or `NAME` under your account)."}
    )
    hub_private_repo: bool = field(
        default=True,
        metadata={"help": "Create the repository as private (default); `--hub_private_repo false` makes it public."},
    )
    hub_revision: str | None = field(
        default=None, metadata={"help": "Branch to push to (created from `main` when missing; default: `main`)."}
    )
    reference_model: str | None = field(
        default=None,
        metadata={"help": "A model retrained without the forget rows (Hub id or folder) that the card compares with."},
    )
    reference_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --reference_model."})

    def __post_init__(self):
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise DeepCleanError(f"--output_dir: got {self.output_dir!r}; expected a folder path.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise DeepCleanError(f"--seed: got {self.seed!r}; expected an integer.")
        if self.hub_model_id is not None:
            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError:
                raise DeepCleanError(
                    f"--hub_model_id: got {self.hub_model_id!r}; expected a Hub repository id such as my-org/my-model."
                ) from None
        if self.reference_model is not None and not str(self.reference_model).strip():
            raise DeepCleanError(f"--reference_model: got {self.reference_model!r}; expected a Hub id or a folder.")
        if self.push_to_hub and self.hub_model_id is None:
            raise DeepCleanError("--hub_model_id: got None; expected ORG/NAME when --push_to_hub is set.")
        revision = self.hub_revision
        if revision is not None and (not isinstance(revision, str) or not re.fullmatch(r"[^\s~^:?*\[\\]+", revision)):
            raise DeepCleanError(f"--hub_revision: got {self.hub_revision!r}; expected a branch name such as main.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DeepCleanConfig, OutputArguments)


def arguments_to_dict(*arguments) -> dict[str, Any]:
    """Flatten argument dataclasses into one `{field: value}` dict (the shape of `--config` files)."""
    merged: dict[str, Any] = {}
    for args in arguments:
        merged.update(asdict(args))
    return merged
