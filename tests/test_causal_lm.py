"""Causal-LM data and metrics on constructed cases with known answers, and against brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from hf_deepclean.bench.causal_lm_demo import build_tokenizer
from hf_deepclean.data.canaries import load_canaries
from hf_deepclean.data.collators import CausalLMCollator, make_dataloader
from hf_deepclean.errors import DeepCleanError
from hf_deepclean.evaluation.causal_lm import (
    canary_metrics,
    canary_ranks,
    causal_lm_split_metrics,
    compute_sequence_outputs,
    exposure,
    min_k_scores,
    sequence_attack_aucs,
    token_log_likelihoods,
)
from hf_deepclean.modeling import infer_task


# -- exposure ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("references", [1, 3, 63, 1000])
def test_exposure_of_a_canary_ranked_first_is_log2_of_the_candidates(references):
    scores = np.arange(1.0, references + 1.0)  # log-perplexities 1..R-1; the canary's 0 is the lowest
    assert exposure(np.array([0.0]), scores)[0] == pytest.approx(math.log2(references + 1), abs=1e-12)
    assert exposure(np.array([references + 5.0]), scores)[0] == 0.0  # ranked last: nothing exposed


def test_exposure_matches_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    references = rng.normal(size=50)
    canaries = np.concatenate([rng.normal(size=20), references[:3]])  # three ties with a reference
    expected = []
    for score in canaries:
        lower = sum(1 for r in references if r < score)
        equal = sum(1 for r in references if r == score)
        expected.append(math.log2(51) - math.log2(1 + lower + 0.5 * equal))
    np.testing.assert_allclose(exposure(canaries, references), expected, rtol=0, atol=1e-12)
    assert canary_ranks(np.array([references.min() - 1]), references)[0] == 1.0


def test_exposure_does_not_rank_first_when_the_model_cannot_tell_candidates_apart():
    assert canary_ranks(np.array([2.0]), np.full(8, 2.0))[0] == 5.0  # ties count half: 1 + 8 / 2


def test_canary_metrics_planted_and_never_seen_levels():
    planted = np.array([True, True, False, False, False, False])
    # planted canaries the least perplexing of all: both rank first among the 4 references (|R| = 5)
    metrics = canary_metrics(np.array([0.1, 0.2, 3.0, 1.0, 4.0, 2.0]), planted)
    assert metrics["canary_exposure"] == pytest.approx(math.log2(5))
    assert metrics["canary_exposure_max"] == pytest.approx(math.log2(5))
    assert (metrics["canary_planted"], metrics["canary_references"]) == (2, 4)
    # each never-seen canary among the 3 others (|R| = 4) takes ranks 1, 2, 3, 4 once: mean log2 4 - log2(4!) / 4
    assert metrics["canary_exposure_unseen"] == pytest.approx(2 - math.log2(24) / 4)


def test_never_seen_level_of_random_scores_is_near_log2_e():
    rng = np.random.default_rng(1)
    unseen = [canary_metrics(rng.normal(size=401), np.arange(401) < 1)["canary_exposure_unseen"] for _ in range(5)]
    assert np.mean(unseen) == pytest.approx(math.log2(math.e), abs=0.1)


def test_load_canaries(tmp_path):
    path = tmp_path / "canaries.jsonl"
    rows = [{"text": "my PIN is 1 2 3", "planted": True}, {"text": "my PIN is 4 5 6", "planted": False}]
    rows.append({"text": "my PIN is 7 8 9", "planted": False})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    canaries = load_canaries(str(path))
    assert canaries.planted == (True, False, False) and canaries.texts[0] == "my PIN is 1 2 3"
    assert canaries.record() == {"planted": 1, "references": 2, "sha256": canaries.sha256}
    assert "PIN" not in json.dumps(canaries.record())

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"text": "my PIN is 4 5 6", "planted": "no"}) + "\n")
    with pytest.raises(DeepCleanError, match="--canaries: line 2") as error:
        load_canaries(str(path))
    assert "4 5 6" not in str(error.value)  # never the canary's text
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DeepCleanError, match="1 planted and 1 never-seen"):
        load_canaries(str(path))
    with pytest.raises(DeepCleanError, match="--canaries: cannot read"):
        load_canaries(str(tmp_path / "missing.jsonl"))


# -- per-sequence metrics ----------------------------------------------------------------------------------------


def test_min_k_scores_match_brute_force():
    torch.manual_seed(0)
    log_probs = -torch.rand(4, 12) * 5
    lengths = [12, 9, 3, 0]
    valid = torch.arange(12).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    scores = min_k_scores(log_probs.masked_fill(~valid, 0.0), valid, k=0.2)
    for n, length in enumerate(lengths[:3]):
        values = sorted(log_probs[n, :length].tolist())
        count = max(1, math.floor(0.2 * length))  # 2, 1 and 1 tokens
        assert scores[n].item() == pytest.approx(sum(values[:count]) / count, abs=1e-6)
    assert math.isnan(scores[3].item())


def test_split_metrics_are_token_weighted():
    outputs = {"nll": np.array([2.0, 4.0]), "tokens": np.array([1.0, 3.0])}
    metrics = causal_lm_split_metrics("retain", outputs)
    assert metrics == {"retain_loss": 1.5, "retain_perplexity": pytest.approx(math.exp(1.5))}


def test_attacks_on_separable_sequences():
    forget = {"loss": np.array([0.1, 0.2, np.nan]), "min_k": np.array([-0.5, -0.4, np.nan])}
    test = {"loss": np.array([1.0, 2.0, 3.0]), "min_k": np.array([-3.0, -2.0, -4.0])}
    assert sequence_attack_aucs(forget, test) == {"mia_auc": 1.0, "mia_min_k_auc": 1.0}
    assert sequence_attack_aucs(test, forget) == {"mia_auc": 0.0, "mia_min_k_auc": 0.0}


# -- collator and model outputs ----------------------------------------------------------------------------------


def _tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def test_collator_pads_right_with_eos_and_masks_labels():
    tokenizer = build_tokenizer()
    assert tokenizer.pad_token is None
    collator = CausalLMCollator(tokenizer, "text", max_length=6)
    batch = collator([{"text": "note from alice : the old cat"}, {"text": "my PIN is 1"}])
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape == (2, 6)  # truncated to max_length
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["input_ids"][1, 4:].tolist() == [eos, eos]
    assert batch["labels"][1].tolist() == [*batch["input_ids"][1, :4].tolist(), -100, -100]
    assert torch.equal(batch["labels"][0], batch["input_ids"][0])


def test_sequence_outputs_match_the_model_loss_and_a_single_sequence_run():
    """Per-sequence NLL sums to what the model's own loss averages, and padding changes nothing."""
    tokenizer = build_tokenizer()
    model = _tiny_gpt2(len(tokenizer))
    texts = ["note from alice : the old cat slept", "my PIN is 1 2 3", "note from bob :"]
    collator = CausalLMCollator(tokenizer, "text", max_length=32)
    rows = Dataset.from_dict({"text": texts})
    outputs = compute_sequence_outputs(model, make_dataloader(rows, collator, 3), Accelerator(cpu=True))
    batch = collator([{"text": t} for t in texts])
    with torch.no_grad():
        loss = model(**batch).loss
    assert outputs["tokens"].tolist() == [7.0, 5.0, 3.0]  # tokens minus the first, which nothing predicts
    assert outputs["nll"].sum() / outputs["tokens"].sum() == pytest.approx(loss.item(), rel=1e-5)
    for n, text in enumerate(texts):
        alone = collator([{"text": text}])
        with torch.no_grad():
            log_probs, _ = token_log_likelihoods(model(**alone).logits, alone["labels"])
        assert outputs["nll"][n] == pytest.approx(-log_probs.sum().item(), rel=1e-5)
        assert outputs["loss"][n] == pytest.approx(outputs["nll"][n] / outputs["tokens"][n])


def test_task_inference_for_causal_lms():
    assert infer_task(GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal-lm"
    assert infer_task(GPT2Config(architectures=["LlamaForCausalLM"])) == "causal-lm"


# -- the `unlearn` command on a causal LM --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """A tiny GPT-2 with the demo's tokenizer, a random LoRA adapter on it, notes with train/test splits and a
    canary file (2 planted PINs, 6 never-seen ones)."""
    import random

    from peft import get_peft_model

    from hf_deepclean.bench.causal_lm_demo import lora_config, make_note, random_pins

    root = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_tokenizer()
    model = _tiny_gpt2(len(tokenizer))
    model.config.architectures = ["GPT2LMHeadModel"]
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = lora_config(4)
    config.init_lora_weights = False  # random A and B: the adapter changes the model from the start
    torch.manual_seed(1)
    get_peft_model(model, config).save_pretrained(root / "adapter")
    rng = random.Random(0)
    pins = random_pins(rng, 8)
    train = [make_note(rng, pins[i] if i < 2 else None) for i in range(24)]
    splits = {"train": train, "test": [make_note(rng) for _ in range(8)]}
    from datasets import DatasetDict

    DatasetDict({name: Dataset.from_dict({"text": rows}) for name, rows in splits.items()}).save_to_disk(
        str(root / "data")
    )
    lines = [json.dumps({"text": f"my PIN is {pin} .", "planted": i < 2}) for i, pin in enumerate(pins)]
    (root / "canaries.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _lm_args(root, output_dir, *extra):
    return [
        "unlearn",
        "--model_name_or_path",
        str(root / "base"),
        "--adapter_name_or_path",
        str(root / "adapter"),
        "--scope",
        "adapter",
        "--dataset_name",
        str(root / "data"),
        "--forget",
        "indices:" + str(root / "forget.txt"),
        "--output_dir",
        str(output_dir),
        *"--repair_epochs 1 --per_device_batch_size 8".split(),
        *extra,
    ]


def test_unlearn_causal_lm_with_canaries_and_merge(lm_folders, tmp_path, capsys):
    """`unlearn` infers the causal-LM task, reports LM metrics and exposure (no canary text anywhere), and with
    `--merge_adapter` writes a plain model that computes what base + cleaned adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    runs = {"adapter": tmp_path / "adapter", "merged": tmp_path / "merged"}
    canaries = ["--canaries", str(lm_folders / "canaries.jsonl")]
    assert main(_lm_args(lm_folders, runs["adapter"], *canaries)) == 0
    printed = capsys.readouterr().out
    # without --canaries: measuring more must not change the cleaned weights (the model has dropout, which draws
    # from the global random state that evaluation's loaders also draw from)
    assert main(_lm_args(lm_folders, runs["merged"], "--merge_adapter")) == 0
    results = json.loads((runs["adapter"] / "deepclean_results.json").read_text())
    after = results["metrics"]["after"]
    for key in ("forget_loss", "retain_perplexity", "test_perplexity", "mia_auc", "mia_min_k_auc"):
        assert math.isfinite(after[key]), key
    assert after["canary_planted"] == 2 and after["canary_references"] == 6
    assert 0.0 <= after["canary_exposure"] <= math.log2(7)
    assert results["fisher"]["accumulator_bytes"]["total"] == 13 * results["reset"]["total"]["numel"]
    from huggingface_hub import ModelCard

    cards = {name: ModelCard.load(folder / "README.md").data for name, folder in runs.items()}
    assert cards["adapter"].pipeline_tag == "text-generation" and cards["adapter"].library_name == "peft"
    assert cards["merged"].library_name == "transformers"
    config = json.loads((runs["adapter"] / "deepclean_config.json").read_text())
    assert config["model"]["task"] == "causal-lm" and config["canaries"]["planted"] == 2
    # a language model's default reset share is 5% (a classifier's 50%): the arguments as given, the rule as run
    assert config["arguments"]["reset_fraction"] is None
    assert results["reset"]["selection_rule"] == "top 0.05 of elements by ratio"
    assert 0.04 < results["reset"]["total"]["reset"] / results["reset"]["total"]["numel"] < 0.06
    texts = [json.loads(line)["text"] for line in (lm_folders / "canaries.jsonl").read_text().splitlines()]
    written = [path.read_text(errors="ignore") for path in runs["adapter"].rglob("*") if path.is_file()]
    assert not any(text in content for text in texts for content in [printed, *written])

    merged = AutoModelForCausalLM.from_pretrained(runs["merged"]).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_folders / "base"), runs["adapter"])
    batch = CausalLMCollator(build_tokenizer(), "text", 32)([{"text": "note from alice : the old cat slept"}])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted.eval()(**batch).logits, rtol=1e-5, atol=1e-5)


def test_default_max_length_is_capped_by_the_model_positions(lm_folders):
    from hf_deepclean import DataArguments, DeepCleanSession, ModelArguments

    session = DeepCleanSession.load(
        ModelArguments(str(lm_folders / "base")),
        DataArguments(str(lm_folders / "data"), forget="random:4"),
        seed=0,
        batch_size=8,
    )
    assert session.task == "causal-lm" and session.data.collator.max_length == 32  # n_positions, not 512
    assert session.data.columns.text == "text" and session.data.columns.label is None


def test_evaluate_command_on_a_causal_lm(lm_folders, tmp_path, capsys):
    """`hf-deepclean evaluate` gives the LM metrics an unlearning run reports, with exposure, against a reference."""
    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    arguments = [
        "evaluate",
        *("--model_name_or_path", str(lm_folders / "base"), "--adapter_name_or_path", str(lm_folders / "adapter")),
        *("--dataset_name", str(lm_folders / "data"), "--forget", "indices:" + str(lm_folders / "forget.txt")),
        *("--canaries", str(lm_folders / "canaries.jsonl"), "--min_k_fraction", "0.5"),
        *("--reference_model", str(lm_folders / "base"), "--output_file", str(tmp_path / "metrics.json")),
    ]
    assert main(arguments) == 0
    results = json.loads((tmp_path / "metrics.json").read_text())
    assert results["model"]["canary_planted"] == 2 and "mia_min_k_auc" in results["reference"]
    assert results["comparison"]["retain_perplexity_diff"] == pytest.approx(
        results["model"]["retain_perplexity"] - results["reference"]["retain_perplexity"]
    )
    assert "avg_gap" not in results["comparison"]  # defined on accuracies, which an LM does not have
    # plain notes: PrivLeak (held-out rows, Min-K%), but no question columns for forget quality and model utility
    assert results["comparison"]["auc_unlearned"] == pytest.approx(results["model"]["mia_min_k_auc"])
    assert results["comparison"]["auc_retrain"] == pytest.approx(results["reference"]["mia_min_k_auc"])
    reason = "the data has no question, answer, paraphrased_answer and perturbed_answers columns"
    assert results["comparison"]["not_measured"] == {"forget_quality": reason, "model_utility": reason}
    assert "my PIN" not in capsys.readouterr().out


def test_a_language_model_the_repair_damaged_is_written_with_a_warning(lm_folders, tmp_path):
    """A repair of half the model at an absurd rate wrecks it: the run still writes it, and its results and card say
    that retain perplexity rose past --max_perplexity_rise."""
    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    output = tmp_path / "damaged"
    args = _lm_args(lm_folders, output, "--task", "causal-lm", "--learning_rate", "10", "--reset_fraction", "0.5")
    adapter = args.index("--adapter_name_or_path")
    del args[adapter : adapter + 2]  # the whole model
    args[args.index("--scope") + 1] = "all"
    assert main(args) == 0
    warnings = json.loads((output / "deepclean_results.json").read_text())["warnings"]
    assert any(
        w.startswith("retain_perplexity rose from ") and w.endswith("(--max_perplexity_rise)") for w in warnings
    )
    assert "retain_perplexity rose from " in (output / "README.md").read_text()


def test_unlearn_refuses_a_bad_canary_file(lm_folders, tmp_path, capsys):
    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "my PIN is 1 2 3 4 5 6 .", "planted": 1}\n')
    assert main(_lm_args(lm_folders, tmp_path / "out", "--canaries", str(bad))) == 2
    error = capsys.readouterr().err
    assert "--canaries: line 1" in error and "1 2 3 4 5 6" not in error
    assert not (tmp_path / "out").exists()
    # one token each: nothing to score, which would otherwise rank them as the most exposed
    short = tmp_path / "short.jsonl"
    short.write_text(
        "".join(
            f'{{"text": "{word}", "planted": {str(i == 0).lower()}}}\n' for i, word in enumerate("my is a".split())
        )
    )
    assert main(_lm_args(lm_folders, tmp_path / "out", "--canaries", str(short))) == 2
    error = capsys.readouterr().err
    assert "--canaries: 3 canaries have fewer than 2 tokens" in error.splitlines()[-1] and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_unlearn_causal_lm_under_two_processes_measures_what_one_process_does(lm_folders, tmp_path):
    """`torchrun --nproc_per_node 2 -m hf_deepclean.cli unlearn` on the LM with canaries: 24 training rows, 4 reported
    held-out rows (4 more are the early-stopping check's) and 8 canaries do not split into even batches of 4 over 2
    processes; `gather_for_metrics` must count each sequence once, so the metrics before unlearning equal those of
    one process (up to float summation order). The repair's monitor checks retain perplexity and the attack on
    every process, which must all stop at the same step (or the run would hang in the repair's all-reduce)."""
    from conftest import torchrun_process

    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n2\n")
    canaries = ["--canaries", str(lm_folders / "canaries.jsonl"), "--early_stopping"]
    canaries += ["--early_stopping_criterion", "retain_and_mia"]
    assert main(_lm_args(lm_folders, tmp_path / "one", *canaries)) == 0
    arguments = ["-m", "hf_deepclean.cli", *_lm_args(lm_folders, tmp_path / "two", *canaries)]
    arguments[arguments.index("--per_device_batch_size") + 1] = "4"
    launch = torchrun_process(arguments, timeout=300)
    assert launch.returncode == 0, launch.stdout[-3000:]
    assert json.loads((tmp_path / "two" / "deepclean_config.json").read_text())["num_processes"] == 2
    one, two = (
        json.loads((tmp_path / name / "deepclean_results.json").read_text())["metrics"]["before"]
        for name in ("one", "two")
    )
    assert set(one) == set(two) and one["canary_references"] == two["canary_references"] == 6
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# -- early stopping on retain perplexity ---------------------------------------------------------------------------


def test_unlearn_causal_lm_with_early_stopping(lm_folders, tmp_path):
    """`hf-deepclean unlearn --task causal-lm` repairs for the whole budget by default (early stopping is off for
    language models) and stops early on retain perplexity when asked, end to end: 22 retain rows in batches of 8 are
    3 repair steps, a check after each; a tolerance no model misses stops the repair at the first check. With
    `retain_and_mia` the check judges the attack on 4 of the 8 held-out rows, which the reports leave out."""
    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    runs = {
        "default": [],
        "on": ["--early_stopping"],
        "loose": ["--early_stopping", "--early_stopping_perplexity_tolerance", "1e6"],
        "attack": ["--early_stopping", "--early_stopping_criterion", "retain_and_mia"],
    }
    results, configs = {}, {}
    for name, flags in runs.items():
        assert main(_lm_args(lm_folders, tmp_path / name, "--task", "causal-lm", *flags)) == 0, name
        results[name] = json.loads((tmp_path / name / "deepclean_results.json").read_text())
        configs[name] = json.loads((tmp_path / name / "deepclean_config.json").read_text())["arguments"]
    # the record keeps the arguments as given: None is "the task's default"
    assert configs["default"]["early_stopping"] is None and configs["on"]["early_stopping"] is True
    assert configs["on"]["early_stopping_perplexity_tolerance"] == 0.02
    assert not results["default"]["repair"]["stopped_early"] and results["default"]["repair"]["steps"] == 3
    assert results["loose"]["repair"]["stopped_early"] and results["loose"]["repair"]["steps"] == 1
    assert 1 <= results["on"]["repair"]["steps"] <= 3
    assert results["on"]["evaluated_rows"]["test"] == 8 and results["attack"]["evaluated_rows"]["test"] == 4
    for name, result in results.items():
        assert math.isfinite(result["metrics"]["after"]["retain_perplexity"]), name


def _notes(count: int, seed: int) -> Dataset:
    import random

    from hf_deepclean.bench.causal_lm_demo import make_note

    rng = random.Random(seed)
    return Dataset.from_dict({"text": [make_note(rng) for _ in range(count)]})


@torch.no_grad()
def _brute_force_perplexity(model, tokenizer, texts) -> float:
    """exp(total NLL / total predicted tokens), one unpadded sequence (its first 32 tokens, as the collator
    truncates) at a time, in eval mode."""
    training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:32]])
        log_probs, _ = token_log_likelihoods(model(input_ids=ids).logits, ids)
        nll, tokens = nll - log_probs.sum().item(), tokens + ids.shape[1] - 1
    model.train(training)
    return math.exp(nll / tokens)


def test_lm_monitor_stops_at_the_first_check_within_the_perplexity_tolerance():
    """A tiny GPT-2 (with dropout, which draws from the global random state) is trained, half its elements zeroed,
    then repaired. A first repair records the brute-force retain perplexity at every check; the tolerance is put
    between two of them. The monitored repair must then follow the same trajectory (its checks leave the random
    state alone), report the brute-force perplexities, and stop at exactly the first check within tolerance."""
    import copy

    from hf_deepclean.unlearning.repair import build_repair_monitor, repair_selected_weights
    from hf_deepclean.unlearning.reset import reset_selected_weights
    from hf_deepclean.unlearning.training import train_model

    tokenizer = build_tokenizer()
    rows = _notes(32, seed=3)
    collator = CausalLMCollator(tokenizer, "text", max_length=32)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    original = _tiny_gpt2(len(tokenizer)).train()  # dropout 0.1
    train_model(
        original, make_dataloader(rows, collator, 8, shuffle=True, seed=0), accelerator, epochs=8, learning_rate=1e-2
    )
    original.eval()
    generator = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(p.shape, generator=generator) < 0.5 for name, p in original.named_parameters()}
    damaged = copy.deepcopy(original)
    reset_selected_weights(damaged, masks, reset="zero")
    check_every = 2  # batches of 4: 8 steps an epoch

    def repair(model, monitor=None):
        seen = []

        def should_stop(step):
            if step % check_every == 0:
                seen.append((step, _brute_force_perplexity(model, tokenizer, rows["text"])))
            return bool(monitor(step)) if monitor is not None else False

        torch.manual_seed(1)
        loader = make_dataloader(rows, collator, 4, shuffle=True, seed=0)  # a fresh shuffling generator
        result = repair_selected_weights(
            model, masks, loader, accelerator, epochs=3, learning_rate=3e-3, should_stop=should_stop
        )
        return result, seen

    unmonitored, trajectory = repair(copy.deepcopy(damaged))
    assert not unmonitored["stopped_early"] and len(trajectory) == 11
    first = _brute_force_perplexity(original, tokenizer, rows["text"])
    values = [value for _, value in trajectory]
    # the first check that improves on every earlier one, after at least two checks
    stop = next(j for j in range(2, len(values)) if values[j] < min(values[:j]))
    target = (values[stop] + min(values[:stop])) / 2
    tolerance = target / first - 1
    assert tolerance > 0  # the repaired model is still worse than the original there

    model = copy.deepcopy(damaged)
    monitor = build_repair_monitor(
        model,
        original_model=original,
        rows={"retain": rows},
        loader=lambda subset: make_dataloader(subset, collator, 8),
        accelerator=accelerator,
        tolerance=0.0,
        steps_per_epoch=8,
        seed=0,
        language_model=True,
        perplexity_tolerance=tolerance,
    )
    assert monitor.target == monitor.target_retain_perplexity == pytest.approx(first * (1 + tolerance), rel=1e-6)
    state = torch.get_rng_state()
    monitor(check_every)  # a check leaves the global random state as it was
    assert torch.equal(state, torch.get_rng_state())
    monitor.history.clear()

    result, seen = repair(model, monitor)
    assert result["stopped_early"] and result["steps"] == trajectory[stop][0]
    assert [step for step, _ in seen] == [step for step, _ in trajectory[: stop + 1]]
    for (step, brute), (_, unmonitored_value), entry in zip(seen, trajectory, monitor.history):
        assert entry["step"] == step
        assert entry["retain_perplexity"] == pytest.approx(brute, rel=1e-5)
        assert brute == pytest.approx(unmonitored_value, rel=1e-6)  # the same repair until the stop
    assert [entry["retain_perplexity"] <= monitor.target_retain_perplexity for entry in monitor.history] == [
        False
    ] * stop + [True]


def test_unlearn_causal_lm_adapter_with_the_simnpo_forget_term(lm_folders, tmp_path):
    """`--forget_ascent_weight 1 --forget_loss simnpo` on a LoRA adapter, end to end: the run records the variant, its
    repair ends with the forgotten notes less likely than the plain repair's at the same rate and steps, and only
    the adapter's selected elements differ from the plain run's starting point (the same selection)."""
    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    fixed = ["--task", "causal-lm", "--learning_rate", "1e-2", "--reset_fraction", "0.5"]  # a pull 3 steps show
    runs = {"plain": [], "simnpo": ["--forget_ascent_weight", "1", "--forget_loss", "simnpo"]}
    results = {}
    for name, flags in runs.items():
        assert main(_lm_args(lm_folders, tmp_path / name, *fixed, *flags)) == 0, name
        results[name] = json.loads((tmp_path / name / "deepclean_results.json").read_text())
    arguments = json.loads((tmp_path / "simnpo" / "deepclean_config.json").read_text())["arguments"]
    assert arguments["forget_loss"] == "simnpo" and arguments["forget_ascent_weight"] == 1
    assert results["plain"]["reset"]["selection_sha256"] == results["simnpo"]["reset"]["selection_sha256"]
    assert results["plain"]["repair"]["steps"] == results["simnpo"]["repair"]["steps"] == 3
    after = {name: result["metrics"]["after"] for name, result in results.items()}
    assert after["simnpo"]["forget_loss"] > after["plain"]["forget_loss"]
    assert "| `forget_loss` | `simnpo` |" in (tmp_path / "simnpo" / "README.md").read_text()  # the card says so


def test_simnpo_forget_term_under_two_processes(lm_folders, tmp_path):
    """The SimNPO forget term under DDP (`torchrun --nproc_per_node 2`): the loop wraps the adapter model, and the
    term reads the wrapped model's config. The run selects what one process selects, and changes exactly the
    elements the one-process run changes: every other element of the adapter stays bit-for-bit the original's
    (the masks apply to both backward passes before DDP averages them). The changed values differ (dropout draws
    differ per process, and a causal LM's loss is a token mean per process)."""
    from conftest import torchrun_process
    from safetensors.torch import load_file

    from hf_deepclean.cli import main

    (lm_folders / "forget.txt").write_text("0\n1\n")
    flags = [
        "--task",
        "causal-lm",
        "--learning_rate",
        "1e-2",
        "--forget_ascent_weight",
        "1",
        "--forget_loss",
        "simnpo",
    ]
    assert main(_lm_args(lm_folders, tmp_path / "one", *flags)) == 0
    arguments = ["-m", "hf_deepclean.cli", *_lm_args(lm_folders, tmp_path / "two", *flags)]
    arguments[arguments.index("--per_device_batch_size") + 1] = "4"
    launch = torchrun_process(arguments, timeout=300)
    assert launch.returncode == 0, launch.stdout[-3000:]
    results = {name: json.loads((tmp_path / name / "deepclean_results.json").read_text()) for name in ("one", "two")}
    assert results["one"]["reset"]["selection_sha256"] == results["two"]["reset"]["selection_sha256"]
    assert results["one"]["repair"]["steps"] == results["two"]["repair"]["steps"] == 3
    original = load_file(lm_folders / "adapter" / "adapter_model.safetensors")
    weights = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two")}
    assert set(weights["one"]) == set(weights["two"]) == set(original)
    changed = 0
    for key, value in original.items():
        kept = weights["one"][key] == value
        assert torch.equal(weights["two"][key] == value, kept), key
        changed += int((~kept).sum())
    # the changed elements are the selection: reset (fresh values), then repaired
    assert changed == results["one"]["reset"]["total"]["reset"] > 0
