"""The demo, at a reduced size: the same path as `make demo`, and the forgetting must show in its table."""

from __future__ import annotations

from transformers import AutoModelForImageClassification

from hf_deepclean.bench.demo import format_demo_table, run_demo


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


def test_causal_lm_demo_forgets_the_secrets(tmp_path):
    """A LoRA adapter memorised secret PINs; unlearning the notes that hold them with `--scope adapter` brings the
    planted canaries' exposure to the never-seen level, for at most 10% more retain perplexity, and leaves the base
    model bit-for-bit unchanged. Nothing written or printed holds a canary's text."""
    import json

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_deepclean.bench.causal_lm_demo import format_causal_lm_table, run_causal_lm_demo

    work = tmp_path / "work"
    result = run_causal_lm_demo(tmp_path / "cleaned", size="small", work_dir=work)
    before, after = result.metrics["original"], result.metrics["deepclean"]
    assert before["canary_exposure"] > before["canary_exposure_max"] - 1  # memorised: near the largest exposure
    assert after["canary_exposure"] < after["canary_exposure_unseen"] + 0.5
    assert after["retain_perplexity"] <= 1.10 * before["retain_perplexity"]
    assert after["forget_perplexity"] > before["forget_perplexity"]

    # the output is the cleaned adapter; the base weights under it are the original ones, bit for bit
    assert (result.output_dir / "adapter_config.json").exists()
    assert not (result.output_dir / "model.safetensors").exists()
    base = load_file(work / "base" / "model.safetensors")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), result.output_dir)
    state = {name.replace(".base_layer", ""): value for name, value in reloaded.get_base_model().state_dict().items()}
    for name, value in base.items():
        assert torch.equal(state[name], value), name
    cleaned, original = (
        load_file(result.output_dir / "adapter_model.safetensors"),
        load_file(work / "adapter" / "adapter_model.safetensors"),
    )
    assert any(not torch.equal(cleaned[k], original[k]) for k in original)

    # Fisher scopes: the adapter's accumulators are the adapter's size (13 bytes per element), far below all's
    scopes = result.fisher_scopes
    assert json.loads((work / "fisher_scopes.json").read_text()) == scopes
    assert scopes["adapter"]["params_in_scope"] == sum(v.numel() for v in original.values())
    assert scopes["adapter"]["accumulator_bytes"] == 13 * scopes["adapter"]["params_in_scope"]
    assert scopes["all"]["params_in_scope"] > 5 * scopes["adapter"]["params_in_scope"]

    table = format_causal_lm_table(result)
    assert table.count("\n| original") == 1 and "canary_exposure" in table and "| adapter |" in table
    canaries = [json.loads(line)["text"] for line in (work / "canaries.jsonl").read_text().splitlines()]
    written = [path.read_text(errors="ignore") for path in result.output_dir.rglob("*") if path.is_file()]
    for text in canaries:
        assert text not in table and not any(text in content for content in written)


def test_causal_lm_demo_refuses_the_image_demo_flags(tmp_path, capsys):
    from hf_deepclean.cli import main

    for flag, value in (("--forget", "class:3"), ("--epochs", "3")):
        argv = ["demo", "--task", "causal-lm", flag, value, "--output_dir", str(tmp_path / "out")]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"hf-deepclean demo: error: {flag}: does not apply to --task causal-lm; expected it only with "
            "image-classification."
        )
    assert not (tmp_path / "out").exists()
