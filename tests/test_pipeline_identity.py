"""The benchmark's DeepClean is the pipeline `hf-deepclean unlearn` runs: the same trained model, rows, seed and
settings give bit-for-bit the same cleaned weights through both entry points."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from transformers import AutoModelForImageClassification

from hf_deepclean.bench.baselines import METHODS, BaselineConfig
from hf_deepclean.bench.benchmark import train_original
from hf_deepclean.bench.scenarios import build_digits_scenario
from hf_deepclean.cli import main
from hf_deepclean.config import DeepCleanConfig


SEED = 3


@pytest.mark.parametrize(
    ("scenario_name", "flags"),
    [
        ("digits_random", {"repair_epochs": 1}),  # the probe picks the learning rate
        ("digits_class", {"repair_epochs": 1, "reset": "zero", "learning_rate": 1e-3, "early_stopping": True}),
    ],
)
def test_benchmark_deepclean_equals_the_unlearn_command(tmp_path, scenario_name, flags):
    scenario = build_digits_scenario(scenario_name, SEED, epochs=2, max_rows=240)
    config = DeepCleanConfig(**flags)
    accelerator = Accelerator(cpu=True)
    inputs = train_original(scenario, accelerator, SEED, config.per_device_batch_size)

    # the trained model and its data, saved as a user's checkpoint and dataset; the forget rows as an indices file
    model_dir, data_dir, forget_file = tmp_path / "original", tmp_path / "data", tmp_path / "forget.txt"
    inputs.model.save_pretrained(model_dir)
    scenario.collator.processor.save_pretrained(model_dir)
    DatasetDict({"train": scenario.train, "test": scenario.test}).save_to_disk(str(data_dir))
    forget_file.write_text("".join(f"{index}\n" for index in scenario.forget_indices))

    output_dir = tmp_path / "cleaned"
    arguments = ["unlearn", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir)]
    arguments += ["--forget", f"indices:{forget_file}", "--seed", str(SEED), "--output_dir", str(output_dir)]
    for name, value in flags.items():
        arguments += [f"--{name}", str(value)]
    assert main(arguments) == 0
    from_cli = AutoModelForImageClassification.from_pretrained(output_dir).state_dict()

    set_seed(SEED)  # as the benchmark seeds each method
    cleaned = METHODS["deepclean"](inputs, config, BaselineConfig())
    from_benchmark = cleaned.state_dict()

    original = inputs.model.state_dict()
    assert from_cli.keys() == from_benchmark.keys()
    assert any(not torch.equal(from_cli[name], original[name]) for name in from_cli)  # something was cleaned
    for name, value in from_cli.items():
        assert torch.equal(value, from_benchmark[name]), name
