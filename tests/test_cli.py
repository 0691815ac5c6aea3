"""End-to-end `hf-deepclean unlearn` runs on tiny text and image models, and the output folder contract."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hf_deepclean.cli import main
from hf_deepclean.hub.output import atomic_output_dir
from hf_deepclean.hub.push import read_reports


def _written_text(folder) -> str:
    """Every text file the run wrote, concatenated (weights are binary and checked separately)."""
    return "\n".join(p.read_text() for p in folder.iterdir() if p.suffix in (".json", ".md", ".txt"))


def _changed_elements(before_dir, after_dir) -> int:
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    assert before.keys() == after.keys()
    return sum(int((before[k] != after[k]).sum()) for k in before)


def _text_args(text_model_dir, text_csv_files, output_dir, *extra):
    return [
        "unlearn",
        "--model_name_or_path",
        str(text_model_dir),
        "--dataset_name",
        "csv",
        "--data_files",
        f"train={text_csv_files / 'train.csv'}",
        f"test={text_csv_files / 'test.csv'}",
        "--output_dir",
        str(output_dir),
        "--repair_epochs",
        "1",
        "--per_device_batch_size",
        "8",
        "--weight_decay",
        "0.1",
        *extra,
    ]


def test_unlearn_text_model_writes_loadable_folder(tmp_path, text_model_dir, text_csv_files, capsys):
    forget_ids = ["r1-3", "r1-17", "r1-42"]
    output_dir = tmp_path / "cleaned"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", f"where:id in {','.join(forget_ids)}")
    assert main(args) == 0

    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    AutoTokenizer.from_pretrained(output_dir)
    assert model.config.num_labels == 2
    assert sorted(p.name for p in output_dir.iterdir() if p.suffix == ".bin") == []

    card = ModelCard.load(output_dir / "README.md")
    # local paths are not Hub ids: the front matter leaves them out, the body names them
    assert card.data.base_model is None and card.data.datasets is None
    assert f"{text_model_dir.name} (local folder)" in card.text and str(text_model_dir) not in card.text
    splits = {result.metric_type: result.dataset_split for result in card.data.eval_results}
    assert splits["forget_accuracy"] == splits["retain_accuracy"] == "train"
    assert splits["test_accuracy"] == splits["mia_auc"] == "test"
    assert {"hf_deepclean", "machine-unlearning"} <= set(card.data.tags)
    metric_names = {result.metric_type for result in card.data.eval_results}
    assert {"forget_accuracy", "retain_accuracy", "test_accuracy", "mia_auc", "mia_efficacy"} <= metric_names

    config = json.loads((output_dir / "deepclean_config.json").read_text())
    assert config["forget"]["num_rows"] == 3
    assert len(config["forget"]["sha256"]) == 64
    assert config["arguments"]["forget"] == "where:id in <redacted>"
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    assert set(results["metrics"]) == {"before", "after"}
    assert {"fisher_forget", "fisher_retain", "probe_learning_rate", "repair", "unlearning"} <= set(results["timings"])
    # no --learning_rate, and the tiny untrained classifier sits at the chance loss before and after its reset: the
    # reset did no damage that trials could measure, so the probe ran none and chose the smallest candidate
    repair = results["repair"]
    assert repair["learning_rate_probe"] == {} and repair["learning_rate_probe_steps"] == 0
    start, reference = repair["learning_rate_probe_start_loss"], repair["learning_rate_probe_reference_loss"]
    assert start == pytest.approx(math.log(2), rel=0.01) and start <= 1.05 * reference
    assert repair["learning_rate"] == 3e-5
    assert "learning rate 3e-05 (the probe's smallest candidate, without trials" in card.text

    written = _written_text(output_dir) + capsys.readouterr().out
    for forget_id in forget_ids:
        assert forget_id not in written

    # every element outside the selection is bit-for-bit the original one
    reset = results["reset"]["total"]
    assert 0 < reset["reset"] <= 0.5 * reset["numel"]
    assert 0 < _changed_elements(text_model_dir, output_dir) <= reset["reset"]


def test_unlearn_image_model_by_class(tmp_path, image_model_dir, image_dataset_dir):
    output_dir = tmp_path / "cleaned-vit"
    args = [
        "unlearn",
        "--model_name_or_path",
        str(image_model_dir),
        "--dataset_name",
        str(image_dataset_dir),
        "--forget",
        "class:3",
        "--output_dir",
        str(output_dir),
        "--repair_epochs",
        "1",
        "--reset",
        "zero",
        "--gamma",
        "2",
        "--learning_rate",
        "0.002",
    ]
    assert main(args) == 0
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    AutoImageProcessor.from_pretrained(output_dir)
    assert isinstance(model.classifier, torch.nn.Linear)
    config = json.loads((output_dir / "deepclean_config.json").read_text())
    assert config["forget"]["kind"] == "class"
    assert config["dataset"]["eval_split"] == "test"
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    assert results["reset"]["selection_rule"] == "ratio > 2"
    assert results["repair"]["learning_rate"] == 0.002 and "learning_rate_probe" not in results["repair"]
    assert "learning rate 0.002 (" in ModelCard.load(output_dir / "README.md").text
    assert ModelCard.load(output_dir / "README.md").data.pipeline_tag == "image-classification"


def test_existing_output_dir_is_refused_then_replaced(tmp_path, text_model_dir, text_csv_files, capsys):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("precious")
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "random:5")

    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--output_dir" in error and "--overwrite_output_dir" in error
    assert (output_dir / "keep.txt").read_text() == "precious"

    assert main([*args, "--overwrite_output_dir"]) == 0
    assert not (output_dir / "keep.txt").exists()
    assert (output_dir / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_user_error_leaves_nothing_behind(tmp_path, text_model_dir, text_csv_files, capsys):
    output_dir = tmp_path / "never"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "where:id==no-such-id")
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("hf-deepclean unlearn: error: --forget: 'where:id == <redacted>' selects no rows")
    assert "no-such-id" not in error
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_config_file_supplies_defaults(tmp_path, text_model_dir, text_csv_files):
    output_dir = tmp_path / "from-yaml"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {text_model_dir}\n"
        "dataset_name: csv\n"
        f"data_files: ['train={text_csv_files / 'train.csv'}', 'test={text_csv_files / 'test.csv'}']\n"
        "forget: random:0.1\n"
        "reset_fraction: 0.05\n"
        "repair_epochs: 0\n"
    )
    assert main(["unlearn", "--config", str(config), "--output_dir", str(output_dir), "--reset_fraction", "0.1"]) == 0
    recorded = json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]
    assert recorded["reset_fraction"] == 0.1
    assert recorded["repair_epochs"] == 0
    assert recorded["forget"] == "random:0.1"


def test_card_front_matter_names_hub_ids(tmp_path, text_model_dir, text_csv_files):
    """Re-render the card of a real run as if model and data had come from the Hub."""
    from hf_deepclean.hub.model_card import render_model_card

    output_dir = tmp_path / "cleaned"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "random:4", "--repair_epochs", "0")
    assert main(args) == 0
    config, results = read_reports(output_dir)
    config.arguments.update(model_name_or_path="my-org/tiny-bert", dataset_name="my-org/reviews", revision="v1")
    card = ModelCard(str(render_model_card(config, results)))
    assert card.data.base_model == "my-org/tiny-bert"
    assert card.data.datasets == ["my-org/reviews"]
    assert card.data.eval_results[0].dataset_type == "my-org/reviews"
    assert "my-org/tiny-bert (revision `v1`)" in card.text


@pytest.mark.parametrize(("max_retain_samples", "read"), [("25", 25), ("0", 60)])
def test_forget_split_and_retain_subsample(tmp_path, image_model_dir, max_retain_samples, read):
    """`split:NAME` forgets a whole split; `--max_retain_samples` bounds the retain Fisher pass (0: every row)."""
    from conftest import make_image_splits
    from datasets import DatasetDict

    splits = make_image_splits(n_train=60, n_test=20)
    extra = make_image_splits(n_train=70, n_test=20)["train"].select(range(60, 70))
    DatasetDict({"train": splits["train"], "leaked": extra, "test": splits["test"]}).save_to_disk(tmp_path / "data")
    output_dir = tmp_path / "out"
    args = [
        "unlearn",
        "--model_name_or_path",
        str(image_model_dir),
        "--dataset_name",
        str(tmp_path / "data"),
        "--forget",
        "split:leaked",
        "--max_retain_samples",
        max_retain_samples,
        "--repair_epochs",
        "0.5",
        "--output_dir",
        str(output_dir),
    ]
    assert main(args) == 0
    config = json.loads((output_dir / "deepclean_config.json").read_text())
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    assert config["forget"] == {**config["forget"], "split": "leaked", "num_rows": 10, "kind": "split"}
    assert config["dataset"]["num_rows"]["retain"] == 60
    fisher = {key: results["fisher"][key] for key in ("forget_samples", "retain_samples", "retain_source")}
    assert fisher == {"forget_samples": 10, "retain_samples": read, "retain_source": "pass"}
    assert results["fisher"]["accumulator_bytes"] == {
        "params_in_scope": 3306, "fisher_sums": 8 * 3306, "ratio": 4 * 3306, "mask": 3306, "total": 13 * 3306,
    }  # fmt: skip
    assert results["repair"]["steps"] == 1  # half an epoch of 2 batches of 32


def _image_args(model_dir, dataset_dir, output_dir, *extra):
    return [
        "unlearn",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(dataset_dir),
        "--forget",
        "class:3",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def test_batchnorm_statistics_stay_unchanged(tmp_path, image_dataset_dir):
    """A CNN with BatchNorm: running statistics are saved weights too, so the masked repair must not move them."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "tiny-resnet"
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    ResNetForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(model_dir)
    output_dir = tmp_path / "cleaned"
    assert main(_image_args(model_dir, image_dataset_dir, output_dir, "--repair_epochs", "2")) == 0
    before, after = load_file(model_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    running = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert running and all(torch.equal(before[k], after[k]) for k in running)
    reset = json.loads((output_dir / "deepclean_results.json").read_text())["reset"]["total"]
    assert 0 < _changed_elements(model_dir, output_dir) <= reset["reset"]


def test_one_channel_image_model(tmp_path, image_dataset_dir):
    """RGB dataset images are converted to the one channel a grayscale model expects."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "gray-vit"
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10, architectures=["ViTForImageClassification"],
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5]).save_pretrained(model_dir)
    assert main(_image_args(model_dir, image_dataset_dir, tmp_path / "out", "--repair_epochs", "0.5")) == 0


def test_no_repair_and_no_eval_split_write_strict_json(tmp_path, text_model_dir, text_csv_files):
    """`--repair_epochs 0` (no loss to report) and a train-only dataset still give strictly valid reports."""
    output_dir = tmp_path / "out"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "random:5", "--repair_epochs", "0")
    args[args.index(f"test={text_csv_files / 'test.csv'}")] = f"train={text_csv_files / 'test.csv'}"
    assert main(args) == 0

    def refuse_constant(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    results = json.loads((output_dir / "deepclean_results.json").read_text(), parse_constant=refuse_constant)
    assert results["repair"] == {"steps": 0, "final_loss": None, "stopped_early": False, "learning_rate": None}
    assert "mia_auc" not in results["metrics"]["after"] and "test_accuracy" not in results["metrics"]["after"]
    card = ModelCard.load(output_dir / "README.md")
    assert "No held-out split was given" in card.text and "mia_efficacy`:" not in card.text
    assert oct(output_dir.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval_split", "validation"], "--eval_split: got 'validation'"),
        (["--eval_split", "train"], "expected a held-out split"),
        (["--label_column", "id"], "--label_column: split 'train' holds labels"),
        (["--text_column", "nope"], "--text_column: got 'nope'"),
    ],
)
def test_bad_split_and_column_arguments(tmp_path, text_model_dir, text_csv_files, capsys, flags, message):
    args = _text_args(text_model_dir, text_csv_files, tmp_path / "out", "--forget", "random:5", *flags)
    assert main(args) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_python_api_with_json_data_and_string_labels(tmp_path, text_model_dir):
    """The exported API on a `json` dataset whose labels are the model's label names."""
    from conftest import make_reviews

    from hf_deepclean import DataArguments, DeepCleanConfig, DeepCleanUnlearner, ModelArguments, OutputArguments

    for split, n, seed in (("train", 40, 3), ("test", 12, 4)):
        rows = [{**row, "label": ["neg", "pos"][row["label"]]} for row in make_reviews(n, seed)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = DeepCleanUnlearner(
        DeepCleanConfig(reset_fraction=0.1, repair_epochs=1, per_device_batch_size=8),
        ModelArguments(str(text_model_dir)),
        DataArguments(
            "json",
            forget="class:pos",
            data_files=[f"train={tmp_path / 'train.jsonl'}", f"test={tmp_path / 'test.jsonl'}"],
        ),
        OutputArguments(str(tmp_path / "out")),
    ).run()
    assert set(results.metrics_before) >= {"forget_accuracy", "test_accuracy", "mia_auc", "mia_efficacy"}
    config = json.loads((tmp_path / "out" / "deepclean_config.json").read_text())
    assert config["forget"]["num_rows"] == results.fisher.forget_samples > 0


def test_early_stopping_and_per_parameter_selection(tmp_path, image_model_dir, image_dataset_dir, capsys):
    output_dir = tmp_path / "cleaned"
    flags = [
        "--repair_epochs",
        "2",
        "--early_stopping",
        "--early_stopping_tolerance",
        "1",
        "--selection_scope",
        "per_parameter",
        "--reset_fraction",
        "0.1",
    ]
    assert main(_image_args(image_model_dir, image_dataset_dir, output_dir, *flags)) == 0
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    # every parameter tensor gets its own 10% (rounded), as long as it has that many positive ratios
    entries = list(results["reset"]["per_parameter"].values())
    assert all(entry["reset"] <= round(0.1 * entry["numel"]) for entry in entries)
    assert sum(entry["reset"] == round(0.1 * entry["numel"]) for entry in entries) > len(entries) // 2
    assert set(results["repair"]) == {
        "steps",
        "final_loss",
        "stopped_early",
        "learning_rate",
        "learning_rate_probe",
        "learning_rate_probe_steps",
        "learning_rate_probe_start_loss",
        "learning_rate_probe_reference_loss",
        "learning_rate_probe_kept_steps",
        "early_stopping_target",
        "early_stopping_checks",
    }
    assert results["repair"]["steps"] <= 2 * 3  # 2 epochs of 3 batches (64 retain rows, batch 32) at most
    # the record keeps every check with what it measured (here one, every step checks: 3 steps an epoch): any
    # retain accuracy is within the tolerance 1 of the original's, so the first ended the repair
    checks, target = results["repair"]["early_stopping_checks"], results["repair"]["early_stopping_target"]
    assert -1 <= target <= 0 and len(checks) == 1 and checks[0].keys() == {"step", "retain_accuracy"}
    assert checks[0]["step"] == results["repair"]["steps"] == 1 and 0 <= checks[0]["retain_accuracy"] <= 1
    config = json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]
    assert config["early_stopping"] is True and config["selection_scope"] == "per_parameter"


def test_early_stopping_on_retain_accuracy_alone(tmp_path, image_model_dir, image_dataset_dir):
    output_dir = tmp_path / "cleaned"
    flags = ["--repair_epochs", "2", "--early_stopping", "--early_stopping_criterion", "retain"]
    flags += ["--early_stopping_tolerance", "1", "--learning_rate", "0.001"]
    assert main(_image_args(image_model_dir, image_dataset_dir, output_dir, *flags)) == 0
    repair = json.loads((output_dir / "deepclean_results.json").read_text())["repair"]
    # any retain accuracy is within 1 of the original's: the first check (every step here) ends the repair, whatever
    # the attack says
    assert repair["steps"] == 1 and repair["stopped_early"] is True
    config = json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]
    assert config["early_stopping_criterion"] == "retain"


@pytest.mark.parametrize(("forget_loss", "retain_and_mia_stops"), [(0.01, False), (1.0, True)])
def test_repair_monitor_criteria(monkeypatch, forget_loss, retain_and_mia_stops):
    """Retain accuracy recovered in both cases; the attack tells forget rows (loss 0.01) from held-out ones (loss
    1.0, AUC 1) in the first, not in the second (identical losses, AUC 0.5)."""
    import numpy as np

    from hf_deepclean.unlearning import repair

    outputs = {
        "forget": {"loss": np.full(8, forget_loss), "correct": np.ones(8)},
        "retain": {"loss": np.full(8, 0.01), "correct": np.ones(8)},
        "test": {"loss": np.full(8, 1.0), "correct": np.ones(8)},
    }
    monkeypatch.setattr(repair, "compute_sample_outputs", lambda model, loader, accelerator, desc: outputs[loader])
    loaders = {split: split for split in outputs}
    for criterion, expected in (("retain", True), ("retain_and_mia", retain_and_mia_stops)):
        monitor = repair.RepairMonitor(
            None, loaders, None, target_retain_accuracy=0.99, check_every=2, criterion=criterion
        )
        assert monitor(1) is False  # not a check step
        assert monitor(2) is expected


def _save_bert_lora(text_model_dir, adapter_dir):
    """A LoRA adapter (random A and B, so that it changes the model) on the tiny BERT, with its trained head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(text_model_dir)
    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(adapter_dir)
    return adapter_dir


def test_adapter_scope_end_to_end(tmp_path, text_model_dir, text_csv_files):
    """`--adapter_name_or_path` + `--scope adapter`: Fisher, selection, reset and repair touch the LoRA weights (and
    the head peft trains with them) only; the output is a peft adapter folder that PeftModel loads."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter_dir = _save_bert_lora(text_model_dir, tmp_path / "adapter")
    output_dir = tmp_path / "cleaned"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "class:pos")
    assert main([*args, "--adapter_name_or_path", str(adapter_dir), "--scope", "adapter"]) == 0

    assert (output_dir / "adapter_config.json").exists() and (output_dir / "adapter_model.safetensors").exists()
    assert not (output_dir / "model.safetensors").exists()
    before, after = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(output_dir / "adapter_model.safetensors"),
    )
    assert set(before) == set(after)
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    stats = json.loads((output_dir / "deepclean_results.json").read_text())["reset"]
    assert 0 < changed <= stats["total"]["reset"]
    adapter_numel = sum(v.numel() for v in before.values())
    assert stats["total"]["numel"] == adapter_numel  # the scope was the adapter, nothing else
    assert sum(entry["numel"] for entry in stats["per_parameter"].values()) == adapter_numel
    assert all("lora_" in name or "modules_to_save" in name for name in stats["per_parameter"])

    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(text_model_dir), output_dir
    )
    base_after = {k: v for k, v in reloaded.named_parameters() if "lora_" not in k and "modules_to_save" not in k}
    original = dict(AutoModelForSequenceClassification.from_pretrained(text_model_dir).named_parameters())
    for name, value in base_after.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(value, original[plain]), name


def test_merge_adapter_writes_merged_model(tmp_path, text_model_dir, text_csv_files):
    """`--merge_adapter` writes a full model that AutoModel loads and that computes what base + cleaned adapter does
    (the same run, seeded, written once as an adapter folder and once merged)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir = _save_bert_lora(text_model_dir, tmp_path / "lora")
    runs = {}
    for name, extra in (("adapter", []), ("merged", ["--merge_adapter"])):
        runs[name] = tmp_path / name
        args = _text_args(text_model_dir, text_csv_files, runs[name], "--forget", "class:pos", *extra)
        assert main([*args, "--adapter_name_or_path", str(adapter_dir), "--scope", "adapter"]) == 0
    assert (runs["merged"] / "model.safetensors").exists() and (runs["merged"] / "tokenizer_config.json").exists()
    assert not (runs["merged"] / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(runs["merged"]).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(text_model_dir), runs["adapter"]
    ).eval()
    original = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(text_model_dir), adapter_dir
    )
    inputs = AutoTokenizer.from_pretrained(runs["merged"])(
        ["a good movie", "the plot was very dull and long", "loved it"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected, got = adapted(**inputs).logits, merged(**inputs).logits
        assert not torch.allclose(original.eval()(**inputs).logits, expected)  # the cleaning changed the adapter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merge_adapter_without_adapter(tmp_path, text_model_dir, text_csv_files, capsys):
    args = _text_args(text_model_dir, text_csv_files, tmp_path / "out", "--forget", "class:pos", "--merge_adapter")
    assert main(args) == 2
    assert "--merge_adapter: needs --adapter_name_or_path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_adapter_scope_without_adapter(tmp_path, text_model_dir, text_csv_files, capsys):
    args = _text_args(text_model_dir, text_csv_files, tmp_path / "out", "--forget", "class:pos", "--scope", "adapter")
    assert main(args) == 2
    assert "--scope: got 'adapter'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("base_kind", "repair_epochs"), [("encoder", 0), ("same-class", 1)])
def test_reset_base_end_to_end(tmp_path, text_model_dir, text_csv_files, base_kind, repair_epochs):
    """`--reset base` puts the selected elements back to the base checkpoint's values: a bare encoder checkpoint
    (`BertModel`, names without `bert.`, no head: the head falls back to fresh values) or one of the very same class.
    Without repair the written model is exactly `where(mask, base, original)`; with it the rest stays the original."""
    from conftest import build_tiny_bert

    from hf_deepclean import DataArguments, DeepCleanConfig, DeepCleanUnlearner, ModelArguments, OutputArguments
    from hf_deepclean.unlearning.reset import initial_values

    base_model, _ = build_tiny_bert(seed=1)  # "pretrained" weights, all different from the model's
    base_dir = tmp_path / "pretrained-base"
    (base_model.bert if base_kind == "encoder" else base_model).save_pretrained(base_dir)
    base = {name: p.detach() for name, p in base_model.named_parameters()}
    output_dir = tmp_path / "cleaned"
    unlearner = DeepCleanUnlearner(
        DeepCleanConfig(reset="base", reset_fraction=0.5, repair_epochs=repair_epochs, per_device_batch_size=8),
        ModelArguments(str(text_model_dir), base_model_name_or_path=str(base_dir)),
        DataArguments(
            "csv",
            forget="random:5",
            data_files=[f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}"],
        ),
        OutputArguments(str(output_dir)),
    )
    results = unlearner.run()
    masks = {name: mask for name, mask in unlearner.masks.items() if bool(mask.any())}
    lacking = {name for name in masks if name.startswith("classifier.")} if base_kind == "encoder" else set()
    assert results.reset.mode == "base"
    assert results.reset.base_model == str(base_dir)
    assert set(results.reset.init_fallback) == lacking
    if base_kind == "encoder":
        assert lacking, "the head must be selected for this test to check the fallback"

    original = load_file(text_model_dir / "model.safetensors")
    written = load_file(output_dir / "model.safetensors")
    fresh = initial_values(AutoModelForSequenceClassification.from_pretrained(text_model_dir), sorted(lacking), 42)
    for name, value in written.items():
        mask = masks.get(name, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(value[~mask], original[name][~mask]), name
        if repair_epochs == 0 and name in masks:
            expected = fresh[name] if name in lacking else base[name]
            assert torch.equal(value[mask], expected[mask]), name

    card = (output_dir / "README.md").read_text()
    assert "pretrained-base (local folder)" in card and "`--reset base`" in card and str(base_dir) not in card
    assert all(f"`{name}`" in card for name in lacking)
    recorded = json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]
    assert recorded["reset"] == "base" and recorded["base_model_name_or_path"] == str(base_dir)


@pytest.mark.parametrize("reset", ["init", "base"])
def test_a_damaging_run_warns_with_a_hint(reset, caplog):
    from accelerate import PartialState

    from hf_deepclean.config import DeepCleanConfig
    from hf_deepclean.pipeline.unlearn import damage_warnings

    PartialState(cpu=True)
    config = DeepCleanConfig(reset=reset)  # tolerates a drop of 0.02
    before = {"retain_accuracy": 0.9, "test_accuracy": 0.8}
    with caplog.at_level("WARNING", logger="hf_deepclean.pipeline.unlearn"):
        assert damage_warnings(config, before, {"retain_accuracy": 0.885, "test_accuracy": 0.79}) == []
        assert not caplog.records  # within the tolerance
        warnings = damage_warnings(config, before, {"retain_accuracy": 0.55, "test_accuracy": 0.7})
    assert warnings == [
        "retain_accuracy fell from 0.900 to 0.550, more than the tolerated 0.02 (--max_accuracy_drop)",
        "test_accuracy fell from 0.800 to 0.700, more than the tolerated 0.02 (--max_accuracy_drop)",
    ]
    (record,) = caplog.records
    assert "retain_accuracy fell from 0.900 to 0.550" in record.getMessage()
    assert ("--base_model_name_or_path" in record.getMessage()) == (reset == "init")
    loose = DeepCleanConfig(reset=reset, max_accuracy_drop=0.5)
    assert damage_warnings(loose, before, {"retain_accuracy": 0.55, "test_accuracy": 0.7}) == []
    assert damage_warnings(config, {"train_loss": 1.0}, {"train_loss": 9.0}) == []  # causal LMs: no accuracy
    # a class forgotten whole: its held-out rows are meant to be lost, only the kept classes' rows count
    import numpy as np

    kept = (np.array([1.0, 1.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0]))  # 0.75 before and after
    assert damage_warnings(config, before, {"retain_accuracy": 0.9, "test_accuracy": 0.6}, kept) == []
    damaged = (np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0]))
    assert damage_warnings(config, before, {"retain_accuracy": 0.9, "test_accuracy": 0.6}, damaged) == [
        "test_accuracy of the kept classes fell from 1.000 to 0.750, more than the tolerated 0.02 (--max_accuracy_drop)"
    ]


def test_a_language_model_whose_perplexity_rose_warns(caplog):
    from accelerate import PartialState

    from hf_deepclean.config import DeepCleanConfig
    from hf_deepclean.pipeline.unlearn import damage_warnings

    PartialState(cpu=True)
    config = DeepCleanConfig()  # tolerates a rise of 25%
    before = {"retain_perplexity": 10.0, "test_perplexity": 20.0}
    assert damage_warnings(config, before, {"retain_perplexity": 12.5, "test_perplexity": 24.0}) == []
    assert damage_warnings(config, before, {"retain_perplexity": 12.6, "test_perplexity": float("nan")}) == [
        "retain_perplexity rose from 10.000 to 12.600, more than the tolerated 25% (--max_perplexity_rise)",
        "test_perplexity rose from 20.000 to nan, more than the tolerated 25% (--max_perplexity_rise)",
    ]
    loose = DeepCleanConfig(max_perplexity_rise=0.3)
    assert damage_warnings(loose, before, {"retain_perplexity": 12.6, "test_perplexity": 25.0}) == []
    assert damage_warnings(config, {"retain_perplexity": float("nan")}, {"retain_perplexity": 50.0}) == []
    # an adapter's base values are its initialisation: the hint is the share and the repair, not a base model
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_deepclean.pipeline.unlearn"):
        assert damage_warnings(DeepCleanConfig(scope="adapter", reset="init"), before, {"retain_perplexity": 13.0})
    (record,) = caplog.records
    assert "try a smaller --reset_fraction or more --repair_epochs" in record.getMessage()
    assert "--base_model_name_or_path" not in record.getMessage()


def test_finetuned_preset_needs_the_base_model(tmp_path, text_model_dir, text_csv_files, capsys):
    output_dir = tmp_path / "out"
    args = _text_args(text_model_dir, text_csv_files, output_dir, "--forget", "random:5", "--preset", "finetuned")
    assert main(args) == 2
    assert "--base_model_name_or_path" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not output_dir.exists()


@pytest.mark.parametrize("card_base", ["loadable", "missing", "none"])
def test_reset_auto_follows_the_base_model_the_card_declares(tmp_path, text_model_dir, text_csv_files, card_base):
    """`--reset auto` (the default): a model whose card names its base (`base_model`, the Hub's convention) is reset
    toward that base; a card without one gives fresh values; a named base that cannot be loaded too, with a warning."""
    import shutil

    from conftest import build_tiny_bert

    model_dir = tmp_path / "fine-tuned"
    shutil.copytree(text_model_dir, model_dir)
    base_dir = tmp_path / "pretrained"
    base_model, _ = build_tiny_bert(seed=1)
    base_model.save_pretrained(base_dir)
    declared = {"loadable": str(base_dir), "missing": str(tmp_path / "no-such-base"), "none": None}[card_base]
    if declared is not None:
        (model_dir / "README.md").write_text(f"---\nbase_model: {declared}\n---\n\n# A fine-tuned model\n")
    output_dir = tmp_path / "cleaned"
    args = _text_args(model_dir, text_csv_files, output_dir, "--forget", "random:5", "--repair_epochs", "0")
    assert main(args) == 0
    results = json.loads((output_dir / "deepclean_results.json").read_text())
    arguments = json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]
    assert arguments["reset"] == "auto"  # as given; the results say what it became
    if card_base == "loadable":
        assert results["reset"]["mode"] == "base" and results["reset"]["base_model"] == str(base_dir)
        # without repair, every selected element is the base model's value (same architecture: no fallback)
        written = load_file(output_dir / "model.safetensors")
        original = load_file(model_dir / "model.safetensors")
        base = load_file(base_dir / "model.safetensors")
        changed = sum(int((written[name] != original[name]).sum()) for name in written)
        at_base = sum(
            int(((written[name] != original[name]) & (written[name] == base[name])).sum()) for name in written
        )
        assert changed > 0 and at_base == changed
        assert "pretrained (local folder)" in (output_dir / "README.md").read_text()
    else:
        assert results["reset"]["mode"] == "init" and "base_model" not in results["reset"]


def test_fisher_self_check_runs_by_default_and_changes_no_weight(tmp_path, image_model_dir, image_dataset_dir):
    """`--fisher_check` (on by default) compares the engine with per-sample autograd on the first forget batch and
    records what it found and cost; it draws no random number, so the cleaned weights are the same without it."""
    outputs = {}
    for check in ("true", "false"):
        output_dir = tmp_path / f"check-{check}"
        args = _image_args(image_model_dir, image_dataset_dir, output_dir, "--repair_epochs", "1")
        assert main([*args, "--fisher_check", check]) == 0
        outputs[check] = output_dir
    fisher = json.loads((outputs["true"] / "deepclean_results.json").read_text())["fisher"]
    assert fisher["check"]["samples"] == 4 and fisher["check"]["max_relative_error"] < 1e-4
    assert 0 < fisher["check"]["share_of_fisher_passes"] < 1
    assert json.loads((outputs["false"] / "deepclean_results.json").read_text())["fisher"]["check"] is None
    checked, unchecked = (load_file(folder / "model.safetensors") for folder in outputs.values())
    assert all(torch.equal(checked[name], unchecked[name]) for name in checked)


def test_fisher_self_check_stops_a_run_on_a_wrong_rule(tmp_path, text_model_dir, text_csv_files, monkeypatch, capsys):
    """A rule that gets the per-sample gradients wrong (here: every Linear layer's, doubled) is caught before anything is
    selected: exit 1, one line naming the parameter, nothing written."""
    from torch import nn

    from hf_deepclean.fisher import rules

    class DoubledLinear(rules.LinearRule):
        def backward(self, use, grad_outputs):
            super().backward(use, tuple(2 * g for g in grad_outputs))

    monkeypatch.setitem(rules.RULES, nn.Linear, DoubledLinear)
    output_dir = tmp_path / "out"
    assert main(_text_args(text_model_dir, text_csv_files, output_dir, "--forget", "random:5")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # the first parameter of a Linear layer the check reads, its weight or its bias (both are wrong)
    assert "Fisher self-check" in error and "(Linear)" in error and re.search(r"'[\w.]+\.(weight|bias)'", error), error
    assert not output_dir.exists()
