"""Unlearning baselines for causal language models, in the benchmark's harness: gradient ascent, gradient difference,
NPO and SimNPO.

Each method descends one objective with the budget every fine-tuning baseline gets (`finetune`, `neggrad_plus`):
DeepClean's repair epochs as passes over the retain rows, with its optimizer settings (AdamW, weight decay, warm-up,
schedule, clipping), at `--learning_rate`, or `--baseline_learning_rate` when that is unset, by default the rate the
scenario trained the model at. The steps run in the library's training loop (`train_model`) on a module whose
forward pass returns the objective (`UnlearningObjective`). Each step reads a batch of retain rows and as many
forget rows: retain row `i` comes with forget row `i mod |forget|`, so that every forget row is read about equally
often, as in `neggrad_plus`, which cycles through the forget rows.

With `L_f` and `L_r` the models' mean token losses (negative log-likelihoods) on the forget and the retain rows of a
step, `log p(y)` a forget row's log-likelihood (the sum over its tokens) and `|y|` its token count:

- `gradient_ascent`: `-L_f`, ascent on the forget rows alone (the retain rows only set the number of steps).
- `gradient_difference`: `-L_f + lambda L_r` (TOFU's baseline, Maini et al. 2024), `lambda = --llm_retain_weight`
  (1, as OpenUnlearning's GradDiff).
- `npo`: Negative Preference Optimization (Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic
  Collapse to Effective Unlearning"), `-(2 / beta) mean log sigmoid(-beta (log p_theta(y) - log p_ref(y))) +
  lambda L_r`, with the trained model, frozen, as the reference `p_ref` (its log-likelihoods of the forget rows are
  computed once, before the first step: it never changes) and `beta = --npo_beta` (0.1, the paper's). The first
  term is `(2 / beta) log 2` at the start and is bounded below by 0, so unlike gradient ascent it cannot diverge.
- `simnpo`: SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
  Unlearning"), `-(2 / beta) mean log sigmoid(-(beta / |y|) log p_theta(y) - gamma) + lambda L_r`: NPO without a
  reference model, the log-likelihood normalised by length, with a reward margin `gamma`; `beta = --simnpo_beta`
  (2.5) and `gamma = --simnpo_gamma` (0).

Losses read every token of a row's text, question and answer alike, as the scenario's model was trained (TOFU's
implementations score the answer tokens only). These methods refuse a classifier's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch import nn
from transformers.utils import ModelOutput

from ..data.collators import CausalLMCollator, make_dataloader
from ..errors import DeepCleanError
from ..unlearning.forget_losses import npo_loss, sequence_log_likelihoods, simnpo_loss
from ..unlearning.training import train_model


if TYPE_CHECKING:
    from ..config import DeepCleanConfig
    from .baselines import BaselineConfig, UnlearningInputs


@dataclass
class LanguageModelBaselineConfig:
    """Hyperparameters of the causal-LM baselines (part of `BaselineConfig`)."""

    npo_beta: float = field(
        default=0.1, metadata={"help": "NPO: inverse temperature beta of the preference loss (Zhang et al.: 0.1)."}
    )
    simnpo_beta: float = field(
        default=2.5, metadata={"help": "SimNPO: inverse temperature beta of the length-normalised loss."}
    )
    simnpo_gamma: float = field(default=0.0, metadata={"help": "SimNPO: reward margin gamma (>= 0)."})
    llm_retain_weight: float = field(
        default=1.0,
        metadata={
            "help": "gradient_difference, npo and simnpo: weight lambda of the retain loss added to the forget "
            "objective (OpenUnlearning: 1)."
        },
    )

    def __post_init__(self):
        positive = (lambda value: 0 < value < math.inf, "a finite number > 0")
        non_negative = (lambda value: 0 <= value < math.inf, "a finite number >= 0")
        self.check_values(
            {
                "npo_beta": positive,
                "simnpo_beta": positive,
                "simnpo_gamma": non_negative,
                "llm_retain_weight": non_negative,
            }
        )

    def check_values(self, checks: dict[str, tuple[Any, str]]) -> None:
        """Raise a one-line `DeepCleanError` for the first field whose value `checks[name] = (accepts, expected)`
        refuses."""
        for name, (accepts, expected) in checks.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not accepts(value):
                raise DeepCleanError(f"--{name}: got {value!r}; expected {expected}.")


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ObjectiveOutput(ModelOutput):
    loss: torch.Tensor | None = None


class UnlearningObjective(nn.Module):
    """A causal LM whose forward pass returns one baseline's objective on a batch of forget and retain rows, so that
    the library's training loop (`train_model`) descends it; only the wrapped model's weights train.

    Args:
        model: the causal LM to unlearn.
        method: `gradient_ascent`, `gradient_difference`, `npo` or `simnpo`.
        baselines: their hyperparameters (`LanguageModelBaselineConfig`).
        reference_log_likelihoods: NPO: the reference model's `log p_ref(y)` of every forget row, in row order.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        baselines: LanguageModelBaselineConfig,
        reference_log_likelihoods: torch.Tensor | None = None,
    ):
        super().__init__()
        if method not in LANGUAGE_MODEL_METHODS:
            raise DeepCleanError(f"--methods: got {method!r}; expected one of {', '.join(LANGUAGE_MODEL_METHODS)}.")
        if method == "npo" and reference_log_likelihoods is None:
            raise ValueError("UnlearningObjective: npo needs the reference log-likelihoods of the forget rows.")
        self.model = model
        self.method = method
        self.baselines = baselines
        self.register_buffer("reference", reference_log_likelihoods, persistent=False)

    def forward(self, forget: dict, retain: dict, forget_index: torch.Tensor) -> ObjectiveOutput:
        if self.method in ("gradient_ascent", "gradient_difference"):
            loss = -self.model(**forget).loss
        else:
            inputs = {key: value for key, value in forget.items() if key != "labels"}
            log_likelihoods, lengths = sequence_log_likelihoods(self.model(**inputs).logits, forget["labels"])
            if self.method == "npo":
                loss = npo_loss(log_likelihoods, self.reference[forget_index], self.baselines.npo_beta)
            else:
                loss = simnpo_loss(log_likelihoods, lengths, self.baselines.simnpo_beta, self.baselines.simnpo_gamma)
        weight = self.baselines.llm_retain_weight
        if self.method != "gradient_ascent" and weight:
            loss = loss + weight * self.model(**retain).loss
        return ObjectiveOutput(loss=loss)


# --------------------------------------------------------------------------------------------------------------
# Rows and the methods
# --------------------------------------------------------------------------------------------------------------


class ForgetRetainPairs(torch.utils.data.Dataset):
    """Retain row `i` with forget row `i mod |forget|`: one pass over the pairs is one pass over the retain rows."""

    def __init__(self, forget: Dataset, retain: Dataset):
        if not len(forget) or not len(retain):
            raise DeepCleanError(f"forget/retain rows: got {len(forget)} and {len(retain)}; expected some of each.")
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.retain)

    def __getitem__(self, index: int) -> dict[str, Any]:
        forget_index = index % len(self.forget)
        return {"forget": self.forget[forget_index], "retain": self.retain[index], "forget_index": forget_index}


class PairCollator:
    """Collates `ForgetRetainPairs` items: each side with the scenario's collator, and the forget rows' indices."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "forget": self.collator([pair["forget"] for pair in pairs]),
            "retain": self.collator([pair["retain"] for pair in pairs]),
            "forget_index": torch.tensor([pair["forget_index"] for pair in pairs], dtype=torch.long),
        }


@torch.no_grad()
def rows_log_likelihoods(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """`log p(y)` of every row of an unshuffled `loader`, in order, in eval mode."""
    model.eval()
    values = []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch.pop("labels")
        values.append(sequence_log_likelihoods(model(**batch).logits, labels)[0])
    return torch.cat(values)


def check_language_model(method: str, inputs: UnlearningInputs) -> None:
    """Refuse a classifier's rows: these methods read a causal LM's token labels."""
    if not isinstance(inputs.collator, CausalLMCollator):
        raise DeepCleanError(
            f"--methods: got {method!r}, a method for causal language models, on a classifier's rows; expected a "
            "causal-LM scenario (facts_*)."
        )


def unlearn_language_model(
    method: str, inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig
) -> nn.Module:
    """Descend `method`'s objective on a copy of the trained model with the fine-tuning baselines' budget."""
    check_language_model(method, inputs)
    accelerator = inputs.accelerator
    model = inputs.copy_model()
    reference = None
    if method == "npo":  # the trained model is the reference: its log-likelihoods before any step
        reference = rows_log_likelihoods(model, inputs.loader(inputs.forget), accelerator.device)
    objective = UnlearningObjective(model, method, baselines, reference)
    pairs = ForgetRetainPairs(inputs.forget, inputs.retain)
    loader = make_dataloader(pairs, PairCollator(inputs.collator), inputs.batch_size, shuffle=True, seed=inputs.seed)
    schedule = inputs.fine_tuning_schedule(config, baselines)
    prepared = accelerator.prepare_model(objective, evaluation_mode=True)  # `train_model` wraps it for DDP
    train_model(prepared, loader, accelerator, desc=METHOD_NAMES[method], **schedule.optimizer_arguments())
    return model.eval()


def gradient_ascent(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Ascend the forget rows' loss for the fine-tuning baselines' budget."""
    return unlearn_language_model("gradient_ascent", inputs, config, baselines)


def gradient_difference(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """Descend `-L_forget + lambda L_retain` for the fine-tuning baselines' budget."""
    return unlearn_language_model("gradient_difference", inputs, config, baselines)


def npo(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """NPO against the frozen trained model, plus `lambda L_retain`, for the fine-tuning baselines' budget."""
    return unlearn_language_model("npo", inputs, config, baselines)


def simnpo(inputs: UnlearningInputs, config: DeepCleanConfig, baselines: BaselineConfig) -> nn.Module:
    """SimNPO (no reference model, length-normalised, margin gamma), plus `lambda L_retain`, for the fine-tuning
    baselines' budget."""
    return unlearn_language_model("simnpo", inputs, config, baselines)


METHOD_NAMES = {
    "gradient_ascent": "Gradient ascent",
    "gradient_difference": "Gradient difference",
    "npo": "NPO",
    "simnpo": "SimNPO",
}
LANGUAGE_MODEL_METHODS = {
    "gradient_ascent": gradient_ascent,
    "gradient_difference": gradient_difference,
    "npo": npo,
    "simnpo": simnpo,
}
