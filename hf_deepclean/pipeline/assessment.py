"""`hf-deepclean evaluate`: how much does a model still remember of the forget set, compared with a reference?

The model and data are loaded exactly as `hf-deepclean unlearn` loads them (same forget specification, columns,
labels and held-out split), so the figures match the `before`/`after` metrics of an unlearning run. The comparison
with a reference (a model retrained without the forget rows) is shared with `unlearn --reference_model`: the
per-metric differences and `avg_gap` (classifiers), and for a causal LM TOFU's forget quality and model utility
(with question columns) and MUSE's PrivLeak (with held-out rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..config import GENERATIVE_TASKS, DataArguments, ModelArguments
from ..distributed import transient_preparations
from ..errors import DeepCleanError
from ..evaluation.lm_attacks import forget_quality_of_scores, privleak_of_outputs, question_scores, retain_utility
from ..evaluation.metrics import compare_to_reference, preserved_random_state
from ..records import ReferenceRecord
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
        `{"model": metrics}`, plus with a reference model `"reference"` (its metrics) and `"comparison"`:
        `{metric}_diff` = model - reference, `avg_gap` for classifiers, and for a causal LM the figures of
        `compare_with_reference` (forget quality, model utility, PrivLeak; `not_measured` says which are missing
        and why).
    """
    session = DeepCleanSession.load(
        model_args,
        data_args,
        seed=eval_args.seed,
        batch_size=eval_args.per_device_batch_size,
        accelerator=accelerator,
    )
    metrics, outputs = session.evaluate(prefix="model ", return_outputs=True)
    results: dict[str, Any] = {"model": metrics}
    if eval_args.reference_model is not None:
        reference = measure_reference(session, eval_args.reference_model, eval_args.reference_revision)
        questions = measure_questions(session, session.model) if reference.questions else {}
        results["reference"] = reference.metrics
        results["comparison"] = compare_to_reference(metrics, reference.metrics)
        if session.task in GENERATIVE_TASKS:
            results["comparison"] |= compare_with_reference(reference, metrics, outputs, questions)
            results["comparison"]["not_measured"] = reference.not_measured
    if session.data.test is None:
        results["note"] = "no held-out split: mia_auc and mia_efficacy need one (--eval_split)."
    return results


@dataclass
class ReferenceMeasures:
    """A reference model's figures, measured once: its metrics, per-sequence outputs and question scores.

    Attributes:
        model, revision: `--reference_model` and `--reference_revision`.
        task: the session's task.
        metrics: the reference's metrics (as the session's `evaluate`), with its own model utility.
        outputs: its per-sample outputs of the evaluated forget, retain and held-out rows.
        questions: its `question_scores` of the session's forget and retain question rows (empty without them).
        retain_answers: the true answers of the retain questions, what model utility's ROUGE-L compares with.
        not_measured: per figure of a language model that cannot be measured on this data, why.
    """

    model: str
    revision: str
    task: str
    metrics: dict[str, float]
    outputs: dict[str, dict[str, np.ndarray]]
    questions: dict[str, dict[str, list]]
    retain_answers: list[str]
    not_measured: dict[str, str]

    def record(self, before: dict[str, float], after: dict[str, float], rows: dict[str, int]) -> ReferenceRecord:
        """The results' `ReferenceRecord`, with the figures of the original (`before`) and cleaned (`after`)
        model against this reference."""
        return ReferenceRecord(self.model, self.revision, self.metrics, before, after, self.not_measured, rows)


def measure_reference(session: DeepCleanSession, name: str, revision: str) -> ReferenceMeasures:
    """Load `--reference_model`, measure what the comparison needs, and free it again.

    The global random state is left as it was (the cleaned weights do not depend on whether a reference was given),
    and nothing stays registered with the Accelerator.
    """
    with preserved_random_state(session.accelerator), transient_preparations(session.accelerator):
        model = session.load_reference(name, revision)
        metrics, outputs = session.evaluate(model, prefix="reference ", return_outputs=True)
        questions = measure_questions(session, model)
        del model
    rows, not_measured = session.question_rows(), unmeasured_figures(session)
    answers = [row["answer"] for row in rows["retain"]] if rows else []
    if "model_utility" not in not_measured and session.task in GENERATIVE_TASKS:
        metrics |= retain_utility(questions["retain"], answers)
    return ReferenceMeasures(name, revision, session.task, metrics, outputs, questions, answers, not_measured)


def measure_questions(session: DeepCleanSession, model: nn.Module) -> dict[str, dict[str, list]]:
    """`question_scores` of `model` on the session's forget questions and, with greedy answers, its retain
    questions (`DeepCleanSession.question_rows`); empty without question rows. Under several processes each one
    scores a contiguous share of the questions and every process receives all scores, in order."""
    rows = session.question_rows()
    if not rows:
        return {}
    accelerator = session.accelerator
    scores = {}
    with preserved_random_state(accelerator):
        for split, questions in rows.items():
            if not questions:
                continue
            with accelerator.split_between_processes(questions) as share:
                part = question_scores(
                    model, session.processor, share, generate=split == "retain", batch_size=session.batch_size
                )
            scores[split] = part if accelerator.num_processes == 1 else {k: gather_object(v) for k, v in part.items()}
    return scores


def unmeasured_figures(session: DeepCleanSession) -> dict[str, str]:
    """For a language model, each of forget quality, model utility and PrivLeak that this data cannot give, and
    why; empty for a classifier (whose comparison is `avg_gap`)."""
    if session.task not in GENERATIVE_TASKS:
        return {}
    missing = {}
    rows = session.question_rows()
    if session.task != "causal-lm":
        question_reason = "measured on causal LMs only"
    elif rows is None:
        question_reason = "the data has no question, answer, paraphrased_answer and perturbed_answers columns"
    else:
        question_reason = None
    for figure, split in (("forget_quality", "forget"), ("model_utility", "retain")):
        if question_reason is not None:
            missing[figure] = question_reason
        elif not rows[split]:
            missing[figure] = f"no question rows among the {split} rows"
    if session.data.test is None:
        missing["privleak"] = "no held-out split to tell the forget rows from (--eval_split)"
    return missing


def compare_with_reference(
    reference: ReferenceMeasures,
    metrics: dict[str, float],
    outputs: dict[str, dict[str, np.ndarray]],
    questions: dict[str, dict[str, list]],
) -> dict[str, float]:
    """A model's figures against the reference, from its `metrics` and per-sample `outputs` (the session's
    evaluation) and its `questions` (`measure_questions`).

    A classifier's figure is `avg_gap`; a language model's are `forget_quality`, `ks_statistic` and
    `forget_truth_ratio`; `model_utility` and its `retain_*` numbers; `privleak`, `auc_unlearned` and
    `auc_retrain`, less those in `reference.not_measured`.
    """
    if reference.task not in GENERATIVE_TASKS:
        return {"avg_gap": compare_to_reference(metrics, reference.metrics)["avg_gap"]}
    figures: dict[str, float] = {}
    if "forget_quality" not in reference.not_measured:
        figures |= forget_quality_of_scores(questions["forget"], reference.questions["forget"])
    if "model_utility" not in reference.not_measured:
        figures |= retain_utility(questions["retain"], reference.retain_answers)
    if "privleak" not in reference.not_measured:
        figures |= privleak_of_outputs(outputs, reference.outputs)
    return figures
