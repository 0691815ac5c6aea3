"""`unlearn --reference_model` on a causal LM with TOFU-style question rows: forget quality, model utility and
PrivLeak in the results and the card, checked against the local `evaluate` modules fed with per-sample quantities
computed here by brute force (one unpadded sequence at a time, greedy decoding by argmax)."""

from __future__ import annotations

import json
import math

import evaluate
import pytest
import torch
from datasets import Dataset, DatasetDict
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_deepclean.bench.facts import build_facts
from hf_deepclean.cli import main
from hf_deepclean.evaluation.modules import metric_path


MIN_K = 0.2  # --min_k_fraction's default: PrivLeak's Min-K% Prob attack


def _word_tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    from hf_deepclean.bench.causal_lm_demo import word_level_tokenizer

    texts = [row[c] for row in rows for c in ("text", "question", "answer", "paraphrased_answer")]
    texts += [answer for row in rows for answer in row["perturbed_answers"]]
    return word_level_tokenizer([word for text in texts for word in text.split()])


def _trained_gpt2(tokenizer, texts: list[str], seed: int) -> GPT2LMHeadModel:
    """The causal-LM demo's GPT-2 (no dropout), smaller, trained on `texts` for 30 epochs."""
    from accelerate import Accelerator

    from hf_deepclean.bench.causal_lm_demo import build_gpt2
    from hf_deepclean.data.collators import CausalLMCollator, make_dataloader
    from hf_deepclean.unlearning.training import train_model

    model = build_gpt2(len(tokenizer), n_embd=32, n_layer=1, seed=seed)
    rows = Dataset.from_dict({"text": texts})
    loader = make_dataloader(rows, CausalLMCollator(tokenizer, "text", 64), batch_size=16, shuffle=True, seed=seed)
    train_model(model, loader, Accelerator(cpu=True), epochs=30, learning_rate=1e-2, desc="train")
    return model.eval()


@pytest.fixture(scope="module")
def facts_folders(tmp_path_factory):
    """10 fictitious people (one forgotten), a tiny GPT-2 trained on every row and a reference trained on the retain
    rows only, both with a word-level tokenizer; the held-out split is the real-world facts."""
    root = tmp_path_factory.mktemp("facts")
    level = build_facts(people=10, seed=0, perturbations=3)["forget10"]
    DatasetDict({"train": level["train"], "test": level["general"]}).save_to_disk(str(root / "data"))
    tokenizer = _word_tokenizer(list(level["train"]) + list(level["general"]))
    for name, rows, seed in (("original", level["train"], 0), ("reference", level["retain"], 1)):
        _trained_gpt2(tokenizer, rows["text"], seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _unlearn(root, output_dir, *extra) -> int:
    return main(
        [
            "unlearn",
            *("--model_name_or_path", str(root / "original"), "--dataset_name", str(root / "data")),
            *("--forget", "where:forget==True", "--text_column", "text", "--output_dir", str(output_dir)),
            *"--repair_epochs 1 --per_device_batch_size 16 --reset_fraction 0.2".split(),
            *extra,
        ]
    )


# -- brute force ---------------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before t), t = 1..n-1, of one unpadded sequence."""
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    return log_probs.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def _answer_log_prob(model, tokenizer, question: str, answer: str) -> float:
    question_ids, answer_ids = _ids(tokenizer, question), _ids(tokenizer, " " + answer)
    return _token_log_probs(model, question_ids + answer_ids)[len(question_ids) - 1 :].mean().item()


@torch.no_grad()
def _greedy(model, tokenizer, question: str, answer: str) -> str:
    ids = _ids(tokenizer, question)
    generated = []
    for _ in range(2 * len(_ids(tokenizer, " " + answer))):
        token = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def _min_k(model, tokenizer, text: str) -> float:
    log_probs = _token_log_probs(model, _ids(tokenizer, text)).sort().values
    return log_probs[: max(1, math.floor(MIN_K * len(log_probs)))].mean().item()


def _question_inputs(model, tokenizer, rows: list[dict]) -> dict[str, list]:
    return {
        "answer_log_prob": [_answer_log_prob(model, tokenizer, r["question"], r["answer"]) for r in rows],
        "paraphrased_log_prob": [
            _answer_log_prob(model, tokenizer, r["question"], r["paraphrased_answer"]) for r in rows
        ],
        "perturbed_log_probs": [
            [_answer_log_prob(model, tokenizer, r["question"], a) for a in r["perturbed_answers"]] for r in rows
        ],
    }


def _figures(model, reference, tokenizer, level: DatasetDict) -> dict[str, dict[str, float]]:
    """What the metric modules give for `model` against `reference`, and the reference's own model utility."""
    questions = {split: [r for r in level[split] if r["perturbed_answers"]] for split in ("forget", "retain")}
    ratios = {
        name: evaluate.load(metric_path("truth_ratio")).compute(
            **{k: v for k, v in _question_inputs(m, tokenizer, questions["forget"]).items() if k != "answer_log_prob"}
        )["ratios"]
        for name, m in (("model", model), ("reference", reference))
    }
    forget_quality = evaluate.load(metric_path("forget_quality")).compute(
        predictions=ratios["model"], references=ratios["reference"]
    )
    utility = {}
    for name, m in (("model", model), ("reference", reference)):
        utility[name] = evaluate.load(metric_path("model_utility")).compute(
            split=["retain"] * len(questions["retain"]),
            **_question_inputs(m, tokenizer, questions["retain"]),
            prediction=[_greedy(m, tokenizer, r["question"], r["answer"]) for r in questions["retain"]],
            reference=[r["answer"] for r in questions["retain"]],
        )
    texts = list(level["forget"]["text"]) + list(level["general"]["text"])
    privleak = evaluate.load(metric_path("privleak")).compute(
        predictions=[_min_k(model, tokenizer, t) for t in texts],
        retrain_predictions=[_min_k(reference, tokenizer, t) for t in texts],
        references=[1] * len(level["forget"]) + [0] * len(level["general"]),
        higher_is_member=True,
    )
    return {
        "model": {**forget_quality, **utility["model"], **privleak},
        "reference": {"model_utility": utility["reference"]["model_utility"]},
    }


# -- tests ---------------------------------------------------------------------------------------------------------


def test_card_shows_forget_quality_utility_and_privleak_against_the_reference(facts_folders, tmp_path):
    """The results hold, and the card shows, what the metric modules give for the cleaned model and the reference
    (per-sample inputs computed here by brute force); the card names the reference and its revision. The reference
    is measured without touching the random state: the cleaned weights equal those of a run without it."""
    root = facts_folders
    assert _unlearn(root, tmp_path / "with", "--reference_model", str(root / "reference")) == 0
    assert _unlearn(root, tmp_path / "without") == 0
    results = json.loads((tmp_path / "with" / "deepclean_results.json").read_text())
    reference = results["reference"]
    assert reference["model"] == str(root / "reference") and reference["revision"] == "main"
    assert reference["not_measured"] == {}
    assert reference["rows"] == {"forget_questions": 9, "retain_questions": 81}

    level = build_facts(people=10, seed=0, perturbations=3)["forget10"]
    tokenizer = AutoTokenizer.from_pretrained(root / "original")
    cleaned = AutoModelForCausalLM.from_pretrained(tmp_path / "with").eval()
    retrained = AutoModelForCausalLM.from_pretrained(root / "reference").eval()
    expected = _figures(cleaned, retrained, tokenizer, level)
    for key in ("forget_quality", "ks_statistic", "model_utility", "retain_rouge_l_recall", "privleak"):
        assert reference["after"][key] == pytest.approx(expected["model"][key], rel=1e-6, abs=1e-9), key
    assert reference["metrics"]["model_utility"] == pytest.approx(expected["reference"]["model_utility"], rel=1e-6)
    assert 0 < reference["after"]["model_utility"] < 1 and 0 < reference["after"]["forget_quality"] <= 1

    card = (tmp_path / "with" / "README.md").read_text()
    assert "Reference model: reference (local folder) (revision `main`)" in card
    for key, label in (
        ("forget_quality", "forget quality"),
        ("model_utility", "model utility"),
        ("privleak", "PrivLeak"),
    ):
        row = next(line for line in card.splitlines() if line.startswith(f"| {label} ("))
        assert f"| {reference['after'][key]:.4g} |" in row and f"{reference['before'][key]:.4g}" in row, row
    assert str(root) not in card  # a local folder is named by its last part only
    # the model-index holds the three figures too, each naming the reference it was measured against
    index = {
        result.metric_type: result for result in ModelCard.load(tmp_path / "with" / "README.md").data.eval_results
    }
    for key, split in (("forget_quality", "train"), ("model_utility", "train"), ("privleak", "train")):
        assert index[key].metric_value == round(reference["after"][key], 6), key
        assert index[key].metric_args == {"reference_model": "reference (local folder)", "reference_revision": "main"}
        assert index[key].dataset_split == split
    without_index = ModelCard.load(tmp_path / "without" / "README.md").data.eval_results
    assert not {"forget_quality", "model_utility", "privleak"} & {result.metric_type for result in without_index}

    no_reference = (tmp_path / "without" / "README.md").read_text()
    assert "Forget quality, model utility (TOFU) and PrivLeak (MUSE) were not measured" in no_reference
    assert "reference" not in json.loads((tmp_path / "without" / "deepclean_results.json").read_text())
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("with", "without")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_bad_reference_model_is_a_one_line_error_naming_the_argument(facts_folders, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert _unlearn(facts_folders, tmp_path / "out", "--reference_model", str(missing)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("hf-deepclean unlearn: error: --reference_model: got ") and str(missing) in error[-1]
    assert "Traceback" not in "\n".join(error) and not (tmp_path / "out").exists()
    assert _unlearn(facts_folders, tmp_path / "out", "--reference_model", " ") == 2
    assert "--reference_model: got ' '; expected a Hub id or a folder." in capsys.readouterr().err


def test_evaluate_reports_the_figures_against_a_reference(facts_folders, tmp_path):
    """`hf-deepclean evaluate` gives the same figures for the original model as `unlearn` records as `before`."""
    root = facts_folders
    arguments = [
        "evaluate",
        *("--model_name_or_path", str(root / "original"), "--dataset_name", str(root / "data")),
        *("--forget", "where:forget==True", "--text_column", "text", "--reference_model", str(root / "reference")),
        *("--output_file", str(tmp_path / "metrics.json")),
    ]
    assert main(arguments) == 0
    comparison = json.loads((tmp_path / "metrics.json").read_text())["comparison"]
    level = build_facts(people=10, seed=0, perturbations=3)["forget10"]
    tokenizer = AutoTokenizer.from_pretrained(root / "original")
    original, retrained = (
        AutoModelForCausalLM.from_pretrained(root / name).eval() for name in ("original", "reference")
    )
    expected = _figures(original, retrained, tokenizer, level)["model"]
    for key in ("forget_quality", "model_utility", "privleak"):
        assert comparison[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert comparison["not_measured"] == {}


def test_a_classifier_card_gets_the_reference_column_and_the_gap(text_model_dir, text_csv_files, tmp_path):
    """With a classifier the reference's metrics become the results table's third column and `avg_gap` (mean
    absolute difference of forget, retain, held-out accuracy and mia_efficacy, in points) joins before and after.
    The reference here is the original itself: its metrics are the `before` ones, and the gap before is 0."""
    argv = [
        "unlearn",
        *("--model_name_or_path", str(text_model_dir), "--reference_model", str(text_model_dir)),
        *("--dataset_name", "csv", "--data_files", f"train={text_csv_files / 'train.csv'}"),
        f"test={text_csv_files / 'test.csv'}",
        *("--forget", "random:6", "--repair_epochs", "1", "--output_dir", str(tmp_path / "out")),
    ]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "deepclean_results.json").read_text())
    before, after, reference = results["metrics"]["before"], results["metrics"]["after"], results["reference"]
    assert reference["metrics"] == pytest.approx(before, rel=1e-6) and reference["before"] == {"avg_gap": 0.0}
    names = ("forget_accuracy", "retain_accuracy", "test_accuracy", "mia_efficacy")
    gap = sum(abs(after[name] - before[name]) * 100 for name in names) / len(names)
    assert reference["after"]["avg_gap"] == pytest.approx(gap, rel=1e-9) and reference["not_measured"] == {}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| Metric | before | after | reference |" in card
    assert f"| avg_gap to reference | 0.00 pp | {gap:.2f} pp |  |" in card
    assert f"| retain_accuracy | {before['retain_accuracy']:.4f} | {after['retain_accuracy']:.4f} | " in card
    assert f"Reference model: {text_model_dir.name} (local folder) (revision `main`)" in card
    assert "were not measured" not in card  # the language-model figures do not apply to a classifier


def test_the_figures_under_two_processes_are_those_of_one(facts_folders, tmp_path):
    """`torchrun --nproc_per_node 2`: each process scores a share of the questions (81 retain questions do not split
    evenly) and every process receives all scores in order; the original model's figures against the reference,
    measured before any unlearning, equal those of one process (up to float summation order)."""
    from conftest import torchrun_process

    root = facts_folders
    reference = ("--reference_model", str(root / "reference"))
    assert _unlearn(root, tmp_path / "one", *reference) == 0
    arguments = [
        *("-m", "hf_deepclean.cli", "unlearn", "--model_name_or_path", str(root / "original")),
        *("--dataset_name", str(root / "data"), "--forget", "where:forget==True", "--text_column", "text"),
        *("--output_dir", str(tmp_path / "two"), "--repair_epochs", "1", "--per_device_batch_size", "8"),
        *("--reset_fraction", "0.2", *reference),
    ]
    launch = torchrun_process(arguments, timeout=300)
    assert launch.returncode == 0, launch.stdout[-3000:]
    one, two = (
        json.loads((tmp_path / name / "deepclean_results.json").read_text())["reference"] for name in ("one", "two")
    )
    assert one["rows"] == two["rows"] == {"forget_questions": 9, "retain_questions": 81}
    for key in ("forget_quality", "model_utility", "retain_rouge_l_recall", "privleak"):
        assert two["before"][key] == pytest.approx(one["before"][key], rel=1e-5), key
    assert two["metrics"]["model_utility"] == pytest.approx(one["metrics"]["model_utility"], rel=1e-5)
