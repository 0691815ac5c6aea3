"""The local `evaluate` metric modules, the gap helpers, and evaluation under several processes."""

from __future__ import annotations

import re
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.metrics import (
    compare_to_reference,
    compute_sample_outputs,
    gap_closed,
    membership_inference_efficacy,
)
from hf_deepclean.evaluation.modules import METRIC_NAMES, metric_path


def test_metric_path_names_a_loadable_folder_per_metric():
    for name in METRIC_NAMES:
        assert evaluate.load(metric_path(name)).name == name
    with pytest.raises(DeepCleanError, match="metric: got 'accuracy'"):
        metric_path("accuracy")


def test_mia_auc_module_known_answers():
    metric = evaluate.load(metric_path("mia_auc"))
    rng = np.random.default_rng(0)
    same = rng.exponential(size=4000)
    # identical distributions: 0.5 within noise
    auc = metric.compute(predictions=same, references=np.r_[np.ones(2000), np.zeros(2000)].astype(int))["mia_auc"]
    assert abs(auc - 0.5) < 0.03
    # separable losses, members lower: 1.0; the other way round: 0.0
    assert metric.compute(predictions=[0.01, 0.02, 1.0, 2.0], references=[1, 1, 0, 0])["mia_auc"] == 1.0
    assert metric.compute(predictions=[1.0, 2.0, 0.01, 0.02], references=[1, 1, 0, 0])["mia_auc"] == 0.0
    # batches accumulate like one call
    metric.add_batch(predictions=[0.01, 1.0], references=[1, 0])
    metric.add_batch(predictions=[0.02, 2.0], references=[1, 0])
    assert metric.compute()["mia_auc"] == 1.0


def test_mia_efficacy_module_matches_the_library_function():
    rng = np.random.default_rng(0)

    def outputs(losses):
        max_prob = np.exp(-losses)
        return {"loss": losses, "entropy": -max_prob * np.log(max_prob), "max_prob": max_prob}

    parts = {
        "retain": outputs(rng.uniform(0.001, 0.05, 300)),
        "test": outputs(rng.uniform(0.5, 3.0, 100)),
        "forget": outputs(np.r_[rng.uniform(0.001, 0.05, 30), rng.uniform(0.5, 3.0, 10)]),
    }
    columns = {key: np.concatenate([part[key] for part in parts.values()]) for key in ("loss", "entropy", "max_prob")}
    split = sum(([name] * len(part["loss"]) for name, part in parts.items()), [])
    result = evaluate.load(metric_path("mia_efficacy")).compute(**columns, split=split)["mia_efficacy"]
    assert result == membership_inference_efficacy(parts["retain"], parts["test"], parts["forget"]) == 0.25
    with pytest.raises(ValueError, match="split"):
        evaluate.load(metric_path("mia_efficacy")).compute(loss=[1.0], entropy=[1.0], max_prob=[0.5], split=["x"])


def test_avg_gap_module_and_helpers():
    names = ["forget_accuracy", "retain_accuracy", "test_accuracy", "mia_efficacy", "mia_auc"]
    model, reference = [0.9, 1.0, 0.8, 0.2, 0.6], [0.5, 0.9, 0.8, 0.6, 0.5]
    result = evaluate.load(metric_path("avg_gap")).compute(
        metric=names, value=model, reference=reference, original_avg_gap=45.0
    )
    # mia_auc has a difference but is not part of avg_gap
    assert result["avg_gap"] == pytest.approx((40 + 10 + 0 + 40) / 4)
    assert result["gap_closed"] == pytest.approx(1 - 22.5 / 45)
    assert result["forget_accuracy_diff"] == pytest.approx(0.4) and result["mia_auc_diff"] == pytest.approx(0.1)
    assert compare_to_reference(dict(zip(names, model)), dict(zip(names, reference))) == pytest.approx(
        {k: v for k, v in result.items() if k != "gap_closed"}
    )
    assert gap_closed(0.0, 10.0) == 1.0 and gap_closed(10.0, 10.0) == 0.0 and gap_closed(20.0, 10.0) == -1.0
    assert np.isnan(gap_closed(1.0, 0.0))


def _echo_rows(n: int) -> list[dict[str, torch.Tensor]]:
    """Rows for a 'classifier' whose logits are its input (see `_Echo`): per-sample outputs are known."""
    return [{"inputs": torch.tensor([float(i), 0.0]), "labels": torch.tensor(i % 2)} for i in range(n)]


class _Echo(torch.nn.Module):
    def forward(self, inputs):
        return type("Output", (), {"logits": inputs})()


def test_sample_outputs_one_process():
    rng_state = torch.get_rng_state()
    outputs = compute_sample_outputs(_Echo(), DataLoader(_echo_rows(7), batch_size=2), Accelerator(cpu=True))
    # logits (i, 0) always predict class 0; the label is i % 2
    assert outputs["correct"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # the loader's iteration drew a seed from the global state inside, but measuring leaves it as it was
    assert torch.equal(torch.get_rng_state(), rng_state)


TWO_PROCESS_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_metric_modules import _Echo, _echo_rows
from hf_deepclean.evaluation.metrics import compute_sample_outputs

accelerator = Accelerator(cpu=True)
outputs = compute_sample_outputs(_Echo(), DataLoader(_echo_rows(7), batch_size=2), accelerator)
print(f"rank={{accelerator.process_index}} of={{accelerator.num_processes}} n={{len(outputs['loss'])}} "
      f"correct={{int(outputs['correct'].sum())}}", flush=True)
"""


def test_sample_outputs_are_gathered_once_across_two_processes(tmp_path):
    """7 rows do not split evenly over 2 processes: Accelerate pads the last batch, gather_for_metrics drops it."""
    from conftest import run_torchrun

    script = tmp_path / "two_process_eval.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)))
    output = run_torchrun([str(script)], timeout=300)
    # (rank 0's progress bar shares the stream, so the lines are found anywhere in it)
    lines = sorted(re.findall(r"rank=\d of=\d n=\d+ correct=\d+", output))
    assert lines == ["rank=0 of=2 n=7 correct=4", "rank=1 of=2 n=7 correct=4"], output[-2000:]
