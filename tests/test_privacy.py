"""No forget-set content leaves a run (issue 8, item 5): canaries planted in the forgotten rows are searched for in
everything `unlearn`, `fisher` and `evaluate` write and print, with default and with verbose logging.

What is planted: a unique string in the texts of the forget rows, unique row ids (listed in the `ids:` file of the
spec, whose name carries a third canary), random-noise images as the forgotten images of an image dataset (their
pixel bytes and PNG encodings are searched for), and the rows' positions and labels (searched for as the lists a
report would hold). Counts and hashes of the forget set are allowed; `datasets`' own Arrow cache of the input files holds
the data by design (README.md, "Limits") and is kept in a folder of its own that is not searched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
from conftest import files_containing, make_image_splits, make_reviews
from datasets import Dataset, DatasetDict, Image


TEXT_CANARY, ID_CANARY, FILE_CANARY = (f"zq{kind}{uuid.uuid4().hex[:12]}" for kind in ("text", "id", "file"))
FORGET_ROWS = [2, 5, 11, 17, 23, 29, 31, 37, 41, 43, 47, 53]
FORGET_IMAGES = [4, 9, 33, 70]

# Runs every command in one process (one interpreter start-up), as the CLI runs them, with stdout and stderr those
# of the process; `verbose` also turns the libraries' own logging up to INFO.
DRIVER = """
import json, sys

import datasets, transformers
from hf_deepclean.cli import main

for verbose, argv in json.loads(sys.argv[1]):
    if verbose:
        transformers.logging.set_verbosity_info()
        datasets.logging.set_verbosity_info()
    print(f"=== {argv[0]}", flush=True)
    print(f"=== {argv[0]}", file=sys.stderr, flush=True)
    print(f"exit {main(argv)}", flush=True)
"""


def _planted_reviews(folder) -> tuple[list[dict], list[str]]:
    """Training rows with canaries in the forget rows (written as CSV), and the forget rows' ids."""
    rows = make_reviews(60, 1)
    for index in FORGET_ROWS:
        rows[index] = {**rows[index], "id": f"{ID_CANARY}{index}", "text": f"{rows[index]['text']} {TEXT_CANARY}"}
    Dataset.from_list(rows).to_csv(folder / "train.csv", index=False)
    Dataset.from_list(make_reviews(20, 2)).to_csv(folder / "test.csv", index=False)
    return rows, [rows[index]["id"] for index in FORGET_ROWS]


def _planted_digits(folder) -> tuple[list[str], list[bytes]]:
    """Digits (saved with `save_to_disk`) whose forget rows are random-noise images with canary ids; returns their
    ids and, for each, the raw pixel bytes and the PNG bytes the dataset stores."""
    from PIL import Image as PILImage

    splits = make_image_splits()
    noise = {i: np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in FORGET_IMAGES}

    def plant(row, index):
        return {"image": PILImage.fromarray(noise[index])} if index in noise else row

    train = splits["train"].map(plant, with_indices=True)
    ids = [f"{ID_CANARY}{i}" if i in noise else f"digit-{i}" for i in range(len(train))]
    train = train.add_column("id", ids)
    DatasetDict({"train": train, "test": splits["test"]}).save_to_disk(str(folder))
    stored = train.cast_column("image", Image(decode=False))
    pixels = [noise[i].tobytes() for i in FORGET_IMAGES] + [stored[i]["image"]["bytes"] for i in FORGET_IMAGES]
    return [ids[i] for i in FORGET_IMAGES], pixels


def _png_text(folder) -> str:
    """The text chunks of every PNG (tEXt, and zTXt/iTXt decompressed), which a byte search could miss."""
    from PIL import Image

    chunks = []
    for path in folder.rglob("*.png"):
        with Image.open(path) as image:
            chunks += [f"{key}={value}" for key, value in image.text.items()]
    return "\n".join(chunks)


def test_forget_rows_appear_in_no_output_file_or_log(tmp_path, text_model_dir, image_model_dir):
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    work.mkdir()
    rows, forget_ids = _planted_reviews(data)
    ids_file = data / f"deletion-request-{FILE_CANARY}.txt"
    ids_file.write_text("\n".join(forget_ids) + "\n")

    image_ids, image_bytes = _planted_digits(data / "digits")
    image_ids_file = data / f"images-{FILE_CANARY}.json"
    image_ids_file.write_text(json.dumps(image_ids))

    common = ["--model_name_or_path", str(text_model_dir), "--dataset_name", "csv", "--data_files"]
    common += [f"train={data / 'train.csv'}", f"test={data / 'test.csv'}", "--per_device_batch_size", "8"]
    by_ids, by_values = f"ids:id:{ids_file}", f"where:id in {','.join(forget_ids)}"
    commands = [
        (False, ["unlearn", *common, "--forget", by_ids, "--output_dir", "cleaned", "--repair_epochs", "1"]),
        (True, ["unlearn", *common, "--forget", by_values, "--output_dir", "cleaned-verbose", "--repair_epochs", "1"]),
        (True, ["fisher", *common, "--forget", by_ids, "--fisher_output", "forget.fisher.safetensors"]),
        (True, ["evaluate", *common, "--forget", by_ids, "--output_file", "metrics.json"]),
        (False, ["unlearn", "--model_name_or_path", str(image_model_dir), "--dataset_name", str(data / "digits"),
                 "--forget", f"ids:id:{image_ids_file}", "--output_dir", "cleaned-image", "--repair_epochs", "1"]),
    ]  # fmt: skip
    for verbose, argv in commands:
        argv += ["--debug"] if verbose else []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),  # the Arrow copy of the data, not searched
        "TRANSFORMERS_VERBOSITY": "warning",
    }
    env.pop("TQDM_DISABLE", None)  # progress bars are printed output too
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = result.stdout + result.stderr
    assert result.stdout.count("exit 0") == len(commands), printed[-5000:]

    # the runs wrote what they were asked to, in the working folder, and nothing else
    assert sorted(p.name for p in work.iterdir()) == [
        "cleaned",
        "cleaned-image",
        "cleaned-verbose",
        "forget.fisher.safetensors",
        "metrics.json",
    ]
    assert {"README.md", "deepclean_config.json", "deepclean_results.json", "deepclean_losses.png"} <= {
        p.name for p in (work / "cleaned").iterdir()
    }
    assert (
        "INFO hf_deepclean.pipeline.session: [RANK 0] Forget set: 12 rows" in result.stderr
    )  # the logs were captured

    labels = [rows[index]["label"] for index in FORGET_ROWS]
    needles = {
        "forget texts": TEXT_CANARY,
        "forget row ids (and the ids file's content)": ID_CANARY,
        "the ids file's name": FILE_CANARY,
        "forget row indices": json.dumps(FORGET_ROWS),
        "forget row indices, one per line": "\n".join(map(str, FORGET_ROWS)),
        "forget row indices, compact": ",".join(map(str, FORGET_ROWS)),
        "forget rows' labels": json.dumps(labels),
        "forget rows' labels, compact": json.dumps(labels, separators=(",", ":")),
    }
    png_text = _png_text(work)
    for what, needle in needles.items():
        assert needle not in printed, f"{what} printed"
        assert files_containing(needle, work) == [], f"{what} written"
        assert needle not in png_text, f"{what} in PNG metadata"
    for number, needle in enumerate(image_bytes):
        assert files_containing(needle, work) == [], f"pixels of forget image {number % len(FORGET_IMAGES)} written"
    # ...while the inputs do hold the canaries: the search would have found a leak
    for needle in (TEXT_CANARY, ID_CANARY, image_bytes[-1]):
        assert files_containing(needle, data)
    # counts and hashes are allowed, and are there
    config = json.loads((work / "cleaned" / "deepclean_config.json").read_text())
    assert config["forget"]["num_rows"] == len(FORGET_ROWS) and len(config["forget"]["sha256"]) == 64
