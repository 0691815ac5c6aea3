"""The demo, at a reduced size: the same path as `make demo`, and the forgetting must show in its table."""

from __future__ import annotations

from transformers import AutoModelForImageClassification

from hf_deepclean.demo import format_demo_table, run_demo


def test_demo_forgets_the_class(tmp_path):
    result = run_demo(tmp_path / "cleaned", epochs=12, work_dir=tmp_path / "work")
    original, cleaned, retrained = (result.metrics[name] for name in ("original", "deepclean", "retrained"))

    # the original knows the class, the retrained model never predicts it, and the cleaned one follows it
    assert original["forget_accuracy"] > 0.8
    assert retrained["forget_accuracy"] < 0.05
    assert cleaned["forget_accuracy"] < 0.2
    assert cleaned["retain_accuracy"] > 0.9
    assert cleaned["avg_gap"] < original["avg_gap"] / 3
    assert cleaned["mia_efficacy"] > original["mia_efficacy"]

    table = format_demo_table(result)
    assert table.count("\n| ") == 3 and "forget_accuracy" in table and "retraining time" in table
    AutoModelForImageClassification.from_pretrained(result.output_dir)
