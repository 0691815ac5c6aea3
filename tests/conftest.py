"""Tiny models built from config and small data sets, all offline.

Everything here is deterministic and small enough that a whole CLI run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import os


# Before anything imports huggingface_hub: never reach for the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a this that movie film plot actor actress scene story ending music is was very quite really not "
    "good great fun loved brilliant moving bad awful boring hated dull weak long short"
).split()
POSITIVE = ["good", "great", "fun", "loved", "brilliant", "moving"]
NEGATIVE = ["bad", "awful", "boring", "hated", "dull", "weak"]
FILLER = ["the", "a", "this", "movie", "film", "plot", "actor", "scene", "story", "music", "is", "was", "very"]


def build_tiny_bert(num_labels: int = 2, seed: int = 0):
    """A 2-layer BERT classifier (hidden 16) and a word-level tokenizer over `WORDS`."""
    torch.manual_seed(seed)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)})
    config = BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        id2label={0: "neg", 1: "pos"} if num_labels == 2 else None,
        label2id={"neg": 0, "pos": 1} if num_labels == 2 else None,
        architectures=["BertForSequenceClassification"],
    )
    return BertForSequenceClassification(config).eval(), tokenizer


def build_tiny_vit(num_labels: int = 10, seed: int = 0):
    """A 1-layer ViT (hidden 16, 4x4 patches on 8x8 RGB images) and its image processor."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
        architectures=["ViTForImageClassification"],
    )
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ViTForImageClassification(config).eval(), processor


def build_tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config).eval()


def make_reviews(n: int, seed: int) -> list[dict]:
    """Synthetic one-sentence reviews of varied length with a sentiment label and a row id."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(1, 8)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"id": f"r{seed}-{i}", "text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    model, tokenizer = build_tiny_bert()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    model, processor = build_tiny_vit()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_csv_files(tmp_path_factory):
    """`train.csv` (60 rows) and `test.csv` (20 rows) with columns id, text, label."""
    path = tmp_path_factory.mktemp("reviews")
    for split, n, seed in (("train", 60, 1), ("test", 20, 2)):
        Dataset.from_list(make_reviews(n, seed)).to_csv(path / f"{split}.csv", index=False)
    return path


def make_image_splits(n_train: int = 80, n_test: int = 30, seed: int = 0) -> DatasetDict:
    """Small digits splits (RGB 8x8 images, ClassLabel `label`) drawn from scikit-learn's bundled set."""
    from hf_deepclean.bench.digits import build_digits_dataset

    splits = build_digits_dataset(seed)
    return DatasetDict({"train": splits["train"].select(range(n_train)), "test": splits["test"].select(range(n_test))})


@pytest.fixture(scope="session")
def image_dataset_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits")
    make_image_splits().save_to_disk(str(path))
    return path


def tree_digest(folder) -> dict[str, str]:
    """`{relative path: SHA-256}` of every file under `folder`: to tell that a folder is exactly as it was."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def files_containing(needle: str | bytes, *folders) -> list[str]:
    """Files under `folders` whose bytes contain `needle` (a string as UTF-8): a search for leaked private data."""
    needle = needle.encode() if isinstance(needle, str) else needle
    hits = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and needle in path.read_bytes():
                hits.append(str(path))
    return hits


# --------------------------------------------------------------------------------------------------------------
# A Hub-speaking server on loopback (tests/hub_server.py), for the tests of loading by repo id and pushing
# --------------------------------------------------------------------------------------------------------------

HUB_TOKEN = "hf_loopback_" + os.urandom(8).hex()  # unique per session, so that a leak is found by searching for it


class LoopbackHub:
    """A running `tests/hub_server.py`: its endpoint, its inspection folder and the environment to reach it."""

    def __init__(self, endpoint: str, root, token: str, home):
        self.endpoint = endpoint
        self.root = root
        self.token = token
        self.home = home

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment for a subprocess that talks to this server with the unmodified client libraries.

        `HF_ENDPOINT` is read when `huggingface_hub` is imported, so it can only be set for a fresh process; offline
        mode is switched off there and only there.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_TOKEN=self.token if token is None else token,
            HF_HOME=str(self.home),  # a private cache: nothing downloaded earlier can stand in for the server
            HF_HUB_DISABLE_XET="1",  # LFS files go through the server's basic LFS transfer, not Xet storage
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        return env

    def state(self) -> dict:
        import json

        return json.loads((self.root / "state.json").read_text())

    def files(self, repo_id: str, branch: str = "main", repo_type: str = "model"):
        """Files of a branch head as the server stores them (`root/files/{type}s/{repo}/@{branch}`)."""
        return self.root / "files" / f"{repo_type}s" / repo_id / f"@{branch}"

    def requests(self) -> list[str]:
        return (self.root / "requests.log").read_text().splitlines()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """Start `tests/hub_server.py` in its own process; stop it by its PID when the session ends."""
    import signal
    import sys
    import time
    from pathlib import Path

    root = tmp_path_factory.mktemp("hub-server")
    port_file = root / "port"
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hub_server.py")), "--root", str(root / "data"), "--token",
         HUB_TOKEN, "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"hub_server.py did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    try:
        yield LoopbackHub(f"http://127.0.0.1:{port_file.read_text()}", root / "data", HUB_TOKEN, root / "hf-home")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


def run_torchrun(arguments: list[str], nproc: int = 2, timeout: float = 600) -> str:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGUMENTS` with `tests/` importable;
    return its output. Killed after `timeout` seconds: callers check the files the run was to write."""
    return torchrun_process(arguments, nproc, timeout).stdout


def torchrun_process(
    arguments: list[str], nproc: int = 2, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`run_torchrun`, returning the launcher's exit status too (-9 when killed at the timeout), optionally with
    another environment (such as `LoopbackHub.env()`)."""
    import sys
    from pathlib import Path

    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    with subprocess.Popen(
        [*command, *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            output, _ = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, output)
