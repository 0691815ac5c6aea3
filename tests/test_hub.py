"""Loading by Hub repo id and publishing to the Hub, against a Hub-speaking server on 127.0.0.1.

What these tests prove: the unmodified `huggingface_hub`, `transformers` and `datasets` clients, driven by
`hf-deepclean`, load a model, its tokenizer and a private dataset by repo id at a given revision, create a private
repository, upload the output folder in one commit with a summarising message (LFS files through the LFS batch API),
push to a branch, report failures on one line, and that the pushed repository downloads and reloads with
`AutoModelForSequenceClassification.from_pretrained`. A canary planted in the forgotten rows, and the token, appear
in no file written or pushed and in no output of the commands.

What they do not prove: that the real Hub accepts these requests. `tests/hub_server.py` answers as the Hub's HTTP
API does for the endpoints these clients use (paths, headers such as `X-Error-Code`, LFS batch), but it skips the
Hub's permissions model, Xet storage (the clients run with `HF_HUB_DISABLE_XET=1`), rate limits and server-side
validation. `test_push_to_the_real_hub` covers that when a token is supplied.

Every client that talks to the server runs in a subprocess: `HF_ENDPOINT` is read when `huggingface_hub` is
imported, and this test process imported it in offline mode (conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import files_containing, make_reviews, tree_digest
from datasets import Dataset, DatasetDict

from hf_deepclean.cli import main
from hf_deepclean.hub.push import commit_message, read_reports


CANARY = "zqcanary" + uuid.uuid4().hex[:12]  # unique to this session, so a hit cannot come from anywhere else
FORGET_ROWS = (3, 17, 29, 42)
MODEL_REPO, DATASET_REPO, CLEANED_REPO = "org/tiny-bert", "org/reviews", "org/tiny-bert-cleaned"

SEED_SCRIPT = """
import sys
from datasets import load_from_disk
from huggingface_hub import HfApi

model_dir, data_dir, image_model_dir = sys.argv[1:4]
api = HfApi()
# The weights stay on branch v1 only: loading `main` fails, so a run that succeeds has honoured --revision v1.
api.create_repo("org/tiny-bert", private=False)
api.upload_folder(folder_path=model_dir, repo_id="org/tiny-bert", commit_message="tiny BERT")
api.create_branch("org/tiny-bert", branch="v1")
api.delete_file("model.safetensors", repo_id="org/tiny-bert", commit_message="drop the weights on main")
# The dataset is pushed by the datasets client itself (parquet files through LFS), private, kept on v1 only.
load_from_disk(data_dir).push_to_hub("org/reviews", private=True)
api.create_branch("org/reviews", branch="v1", repo_type="dataset")
api.delete_folder("data", repo_id="org/reviews", repo_type="dataset", commit_message="drop the data on main")
# An image model whose processor exists on v1 only.
api.create_repo("org/tiny-vit", private=True)
api.upload_folder(folder_path=image_model_dir, repo_id="org/tiny-vit", commit_message="tiny ViT")
api.create_branch("org/tiny-vit", branch="v1")
api.delete_file("preprocessor_config.json", repo_id="org/tiny-vit", commit_message="drop the processor on main")
"""

VERIFY_SCRIPT = """
import json, sys
import torch
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForSequenceClassification, AutoTokenizer

repo_id, revision, local_dir, image_repo = sys.argv[1:5]
folder = snapshot_download(repo_id, revision=revision)
model = AutoModelForSequenceClassification.from_pretrained(repo_id, revision=revision)
AutoTokenizer.from_pretrained(repo_id, revision=revision)
local = AutoModelForSequenceClassification.from_pretrained(local_dir)
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
card = ModelCard.load(repo_id)
# hf_deepclean's own loaders, by repo id and revision, for an image model and its processor
from hf_deepclean.config import ModelArguments
from hf_deepclean.modeling import load_model, load_processor
image_args = ModelArguments(image_repo, revision="v1")
processor = type(load_processor(image_args, "image-classification")).__name__
image_model = type(load_model(image_args, "image-classification")).__name__
print(json.dumps({"snapshot": folder, "same_weights": same, "num_labels": model.config.num_labels,
                  "card": card.data.to_dict(), "image": [image_model, processor]}))
"""


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("hf-deepclean")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_deepclean.cli"]


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _reviews_with_canary() -> DatasetDict:
    train = make_reviews(60, 1)
    for index in FORGET_ROWS:
        train[index] = {**train[index], "id": f"{CANARY}-{index}", "text": f"{train[index]['text']} {CANARY}"}
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(make_reviews(20, 2))})


@pytest.fixture(scope="module")
def cleaned_run(hub_server, text_model_dir, image_model_dir, tmp_path_factory):
    """Seed a model and a dataset repo, then `hf-deepclean unlearn` them by repo id with `--push_to_hub`."""
    work = tmp_path_factory.mktemp("hub-run")
    _reviews_with_canary().save_to_disk(str(work / "reviews"))
    seed_args = [sys.executable, "-c", SEED_SCRIPT, str(text_model_dir), str(work / "reviews"), str(image_model_dir)]
    seeded = _run(seed_args, hub_server.env())
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    shutil.rmtree(work / "reviews")  # the rows with the canary now live on the server only
    ids_file = work / "deletion_request.txt"
    ids_file.write_text("\n".join(f"{CANARY}-{index}" for index in FORGET_ROWS))
    output_dir = work / "cleaned"
    args = [
        *_cli(), "unlearn",
        "--model_name_or_path", MODEL_REPO, "--revision", "v1",
        "--dataset_name", DATASET_REPO, "--dataset_revision", "v1",
        "--forget", f"ids:id:{ids_file}",
        "--output_dir", str(output_dir),
        "--repair_epochs", "1", "--per_device_batch_size", "8",
        "--push_to_hub", "--hub_model_id", CLEANED_REPO,
    ]  # fmt: skip
    unlearned = _run(args, hub_server.env())
    assert unlearned.returncode == 0, unlearned.stderr[-3000:]
    return {"output_dir": output_dir, "unlearn": unlearned, "work": work}


def test_unlearn_by_repo_ids_pushes_one_private_commit(hub_server, cleaned_run, tmp_path):
    output_dir, unlearned = cleaned_run["output_dir"], cleaned_run["unlearn"]
    config, results = read_reports(output_dir)
    assert config.forget.num_rows == len(FORGET_ROWS)
    assert config.arguments["revision"] == config.arguments["dataset_revision"] == "v1"

    # model, tokenizer and the private dataset were read from branch v1 (main has neither weights nor data)
    # (the clients resolve the branch to its commit first, then download by commit)
    requests, state = hub_server.requests(), hub_server.state()
    model_v1, data_v1 = (
        state[f"model:{MODEL_REPO}"]["branches"]["v1"],
        state[f"dataset:{DATASET_REPO}"]["branches"]["v1"],
    )
    assert f"GET /{MODEL_REPO}/resolve/{model_v1}/model.safetensors 200" in requests
    assert f"GET /datasets/{DATASET_REPO}/resolve/{data_v1}/data/train-00000-of-00001.parquet 200" in requests

    # one private repo, one commit on top of the initial one, with the summarising message; the URL was printed
    repo = hub_server.state()[f"model:{CLEANED_REPO}"]
    assert repo["private"] is True
    head = repo["branches"]["main"]
    assert list(repo["branches"]) == ["main"] and len(repo["commits"]) == 2
    summary, description = commit_message(config, results)
    assert repo["commits"][head]["summary"] == summary
    assert repo["commits"][head]["description"] == description
    assert summary.startswith(f"DeepClean: forget {len(FORGET_ROWS)} rows of {DATASET_REPO}, forget_accuracy ")
    assert f"Pushed to the Hub: {hub_server.endpoint}/{CLEANED_REPO}/commit/{head}" in unlearned.stdout.splitlines()

    # the server holds exactly the local folder, byte for byte (plus the repo's .gitattributes)
    pushed = tree_digest(hub_server.files(CLEANED_REPO))
    assert pushed.pop(".gitattributes")
    assert pushed == tree_digest(output_dir)
    assert {"deepclean_fisher_ratios.png", "deepclean_reset_per_module.png", "deepclean_losses.png"} <= set(pushed)

    # a fresh client downloads it and reloads the very same weights; the card's front matter names the repos
    verify_args = [sys.executable, "-c", VERIFY_SCRIPT, CLEANED_REPO, "main", str(output_dir), "org/tiny-vit"]
    verified = _run(verify_args, hub_server.env())
    assert verified.returncode == 0, verified.stderr[-3000:]
    report = json.loads(verified.stdout.strip().splitlines()[-1])
    assert report["same_weights"] is True and report["num_labels"] == 2
    assert report["image"][0] == "ViTForImageClassification" and report["image"][1].startswith("ViTImageProcessor")
    card = report["card"]
    assert card["base_model"] == MODEL_REPO and card["datasets"] == [DATASET_REPO]
    assert {"hf_deepclean", "machine-unlearning"} <= set(card["tags"])
    assert card["model-index"][0]["name"] == CLEANED_REPO
    metrics = {m["type"]: m["value"] for entry in card["model-index"][0]["results"] for m in entry["metrics"]}
    assert metrics["forget_accuracy"] == round(results.metrics_after["forget_accuracy"], 6)

    # neither the canary from the forgotten rows nor the token is anywhere: files written, files pushed, logs
    outputs = unlearned.stdout + unlearned.stderr + verified.stdout + verified.stderr
    assert "Fisher" in unlearned.stderr or "Reset" in unlearned.stderr  # the logs were captured
    for needle in (CANARY, hub_server.token):
        assert needle not in outputs
        assert needle not in json.dumps(repo)  # commit messages and descriptions
        assert files_containing(needle, output_dir, hub_server.files(CLEANED_REPO), Path(report["snapshot"])) == []
    # ...while the seeded dataset on the server does hold it: the search would have found a leak
    assert files_containing(CANARY, hub_server.files(DATASET_REPO, "v1", "dataset"))


def test_push_to_a_branch(hub_server, cleaned_run):
    output_dir = cleaned_run["output_dir"]
    main_head = hub_server.state()[f"model:{CLEANED_REPO}"]["branches"]["main"]
    args = [*_cli(), "push", str(output_dir), "--hub_model_id", CLEANED_REPO, "--hub_revision", "experiment"]
    pushed = _run(args, hub_server.env())
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    repo = hub_server.state()[f"model:{CLEANED_REPO}"]
    assert repo["branches"]["main"] == main_head
    branch_head = repo["branches"]["experiment"]
    assert repo["commits"][branch_head]["parent"] == main_head
    assert pushed.stdout.strip().splitlines()[-1] == (
        f"Pushed to the Hub: {hub_server.endpoint}/{CLEANED_REPO}/commit/{branch_head}"
    )
    files = tree_digest(hub_server.files(CLEANED_REPO, "experiment"))
    files.pop(".gitattributes")
    assert files == tree_digest(output_dir)


def test_refused_push_leaves_the_folder_and_a_retry_succeeds(hub_server, cleaned_run):
    output_dir = cleaned_run["output_dir"]
    before = tree_digest(output_dir)
    args = [*_cli(), "push", str(output_dir), "--hub_model_id", "org/retried", "--hub_private_repo", "false"]
    wrong_token = "hf_wrong_" + uuid.uuid4().hex
    refused = _run(args, hub_server.env(token=wrong_token))
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1, refused.stderr
    assert error[0].startswith("hf-deepclean push: error: --hub_model_id: could not push to 'org/retried'")
    assert "401" in error[0] and "retry with `hf-deepclean push" in error[0]
    assert wrong_token not in refused.stdout + refused.stderr
    assert tree_digest(output_dir) == before
    assert "model:org/retried" not in hub_server.state()

    retried = _run(args, hub_server.env())
    assert retried.returncode == 0, retried.stderr[-3000:]
    repo = hub_server.state()["model:org/retried"]
    assert repo["private"] is False
    assert retried.stdout.strip().endswith(f"/org/retried/commit/{repo['branches']['main']}")
    assert tree_digest(output_dir) == before


# --------------------------------------------------------------------------------------------------------------
# Without a server: failures before and after the run
# --------------------------------------------------------------------------------------------------------------


def _unlearn_args(text_model_dir, text_csv_files, output_dir, *extra):
    return [
        "unlearn",
        "--model_name_or_path", str(text_model_dir),
        "--dataset_name", "csv",
        "--data_files", f"train={text_csv_files / 'train.csv'}", f"test={text_csv_files / 'test.csv'}",
        "--forget", "random:5",
        "--output_dir", str(output_dir),
        "--repair_epochs", "0",
        *extra,
    ]  # fmt: skip


def test_failed_push_after_the_run_keeps_the_written_folder(
    tmp_path, text_model_dir, text_csv_files, monkeypatch, capsys
):
    """In offline mode (as in every test here) the client refuses to connect: the push fails like a network error."""
    token = "hf_offline_" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", token)
    output_dir = tmp_path / "cleaned"
    args = _unlearn_args(text_model_dir, text_csv_files, output_dir, "--push_to_hub", "--hub_model_id", "org/x")
    assert main(args) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("hf-deepclean unlearn: error: --hub_model_id: could not push to 'org/x' (")
    assert error.endswith(f"retry with `hf-deepclean push {output_dir} --hub_model_id org/x`.")
    assert token not in captured.out + captured.err
    assert {"model.safetensors", "README.md", "deepclean_config.json", "deepclean_results.json"} <= {
        p.name for p in output_dir.iterdir()
    }
    assert json.loads((output_dir / "deepclean_config.json").read_text())["arguments"]["hub_model_id"] == "org/x"


def test_push_without_a_token_fails_before_any_work(tmp_path, text_model_dir, text_csv_files, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    output_dir = tmp_path / "never"
    args = _unlearn_args(text_model_dir, text_csv_files, output_dir, "--push_to_hub", "--hub_model_id", "org/x")
    assert main(args) == 2
    assert "--push_to_hub: no Hugging Face token found" in capsys.readouterr().err.splitlines()[-1]
    assert not output_dir.exists()


# --------------------------------------------------------------------------------------------------------------
# Opt-in: the real Hub
# --------------------------------------------------------------------------------------------------------------

REAL_HUB_SCRIPT = """
import subprocess, sys, uuid
from huggingface_hub import HfApi, hf_hub_download

output_dir, cli = sys.argv[1], sys.argv[2:]
api = HfApi()
repo_id = f"{api.whoami()['name']}/hf-deepclean-test-{uuid.uuid4().hex[:8]}"
try:
    subprocess.run([*cli, "push", output_dir, "--hub_model_id", repo_id], check=True)
    assert api.model_info(repo_id).private, "the repository must be private by default"
    readme = open(hf_hub_download(repo_id, "README.md")).read()
    assert "machine-unlearning" in readme and "deepclean_losses.png" in readme
finally:
    api.delete_repo(repo_id, missing_ok=True)
print("real hub ok")
"""


def _real_hub_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    not os.environ.get("HF_DEEPCLEAN_REAL_HUB_TOKEN"),
    reason="opt-in: set HF_DEEPCLEAN_REAL_HUB_TOKEN to a write token to push a private test repo to the real Hub",
)
def test_push_to_the_real_hub(tmp_path, text_model_dir, text_csv_files):
    """Pushes a run to a private repo under the token's account on huggingface.co, downloads its card, deletes it."""
    if not _real_hub_reachable():
        pytest.skip("huggingface.co is not reachable")
    output_dir = tmp_path / "cleaned"
    assert main(_unlearn_args(text_model_dir, text_csv_files, output_dir)) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    env.pop("HF_ENDPOINT", None)
    env.update(HF_TOKEN=os.environ["HF_DEEPCLEAN_REAL_HUB_TOKEN"], HF_HOME=str(tmp_path / "hf-home"))
    result = _run([sys.executable, "-c", REAL_HUB_SCRIPT, str(output_dir), *_cli()], env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert env["HF_TOKEN"] not in result.stdout + result.stderr
