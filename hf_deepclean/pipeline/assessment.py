"""`hf-deepclean evaluate`: how much does a model still remember of the forget set, compared with a reference?

The model and data are loaded exactly as `hf-deepclean unlearn` loads them (same forget specification, columns,
labels and held-out split), so the figures match the `before`/`after` metrics of an unlearning run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from accelerate import Accelerator

from ..config import DataArguments, ModelArguments
from ..errors import DeepCleanError
from ..evaluation.metrics import compare_to_reference
from .session import DeepCleanSession


@dataclass
class EvaluationArguments:
    """What to compare the model with, and where to write the metrics."""

    reference_model: str | None = field(
        default=None,
        metadata={
            "help": "A model that never saw the forget set (usually retrained without it), Hub id or folder; adds "
            "its metrics, the per-metric differences and avg_gap."
        },
    )
    reference_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of --reference_model."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    per_device_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per process."})
    seed: int = field(default=42, metadata={"help": "Seed of `random:` forget specs and of eval subsampling."})

    def __post_init__(self):
        if self.reference_model is not None and (
            not isinstance(self.reference_model, str) or not self.reference_model.strip()
        ):
            raise DeepCleanError(
                f"--reference_model: got {self.reference_model!r}; expected a Hub id or a local folder."
            )
        if not isinstance(self.per_device_batch_size, int) or self.per_device_batch_size < 1:
            raise DeepCleanError(
                f"--per_device_batch_size: got {self.per_device_batch_size!r}; expected a positive integer."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise DeepCleanError(f"--seed: got {self.seed!r}; expected an integer.")


def evaluate_forgetting(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Metrics of a model (and of a reference model) on the forget, retain and held-out rows.

    Args:
        model_args: the model to evaluate.
        data_args: its training data and the forget specification.
        eval_args: the reference model, batch size and seed.
        accelerator: an existing Accelerator (one is created otherwise); under several processes each sample is
            evaluated once (`gather_for_metrics`).

    Returns:
        `{"model": metrics}`, plus `"reference"` and `"comparison"` (`{metric}_diff` = model - reference, and
        `avg_gap`) with a reference model.
    """
    session = DeepCleanSession.load(
        model_args,
        data_args,
        seed=eval_args.seed,
        batch_size=eval_args.per_device_batch_size,
        accelerator=accelerator,
    )
    results: dict[str, Any] = {"model": session.evaluate(prefix="model ")}
    if eval_args.reference_model is not None:
        reference_args = ModelArguments(
            eval_args.reference_model,
            revision=eval_args.reference_revision,
            task=session.task,
            trust_remote_code=model_args.trust_remote_code,
        )
        results["reference"] = session.evaluate(session.load_model(reference_args), prefix="reference ")
        results["comparison"] = compare_to_reference(results["model"], results["reference"])
    if session.data.test is None:
        results["note"] = "no held-out split: mia_auc and mia_efficacy need one (--eval_split)."
    return results
