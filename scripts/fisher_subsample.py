"""How many retain rows the retain Fisher needs: the selection from a seeded sample against the one from every row.

    python scripts/fisher_subsample.py --scenario reviews_random --max_train_rows 2000 --seeds 0 1 --output_dir out

For each seed, trains the scenario's original model as the benchmark does, computes the forget Fisher and the retain
Fisher on every retain row, then on seeded samples of `--sizes` retain rows (`--draws` samples each, as
`--max_retain_samples` draws them), and compares DeepClean's selection (the library's default rule, or
`--reset_fraction` / `--selection_scope`) with each sample's retain Fisher against the selection with the full one:
`agreement` is the share of the full selection that the sample's selection also picks (1.0: the same elements; the
selection's own share: no better than chance). Prints one line per size and writes `fisher_subsample.json` and
`fisher_subsample.png` (agreement against rows) into `--output_dir`.
"""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from hf_deepclean.bench.benchmark import BenchmarkArguments, build_scenario, train_original
from hf_deepclean.bench.scenarios import FACTS_SCENARIOS
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.data.collators import subsample
from hf_deepclean.distributed import default_accelerator
from hf_deepclean.pipeline.deepclean import concrete_config
from hf_deepclean.unlearning.selection import compute_fisher_ratio, select_weights_to_reset


def agreement(masks: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The share of the reference selection's elements that `masks` also selects."""
    both = sum(int((masks[name] & mask).sum()) for name, mask in reference.items())
    return both / max(sum(int(mask.sum()) for mask in reference.values()), 1)


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="reviews_random")
    parser.add_argument("--max_train_rows", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None, help="Training epochs of the original model.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--draws", type=int, default=3, help="Samples of each size (seeds 0 .. draws-1).")
    parser.add_argument("--reset_fraction", type=float, default=None)
    parser.add_argument("--selection_scope", default=None)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    language_model = args.scenario in FACTS_SCENARIOS
    defaults = concrete_config(DeepCleanConfig(), base_known=False, language_model=language_model)
    rule = {
        "reset_fraction": args.reset_fraction or defaults.reset_fraction,
        "max_reset_fraction": defaults.max_reset_fraction,
        "selection_scope": args.selection_scope or defaults.selection_scope,
    }
    accelerator = default_accelerator()
    benchmark_args = BenchmarkArguments(
        scenarios=[args.scenario], max_train_rows=args.max_train_rows, epochs=args.epochs
    )
    results = {"arguments": vars(args), "rule": rule, "seeds": {}}
    for seed in args.seeds:
        set_seed(seed)
        scenario = build_scenario(args.scenario, seed, benchmark_args)
        inputs = train_original(scenario, accelerator, seed)
        forget, full = inputs.fisher("forget"), inputs.fisher("retain")  # the benchmark's Fisher passes
        reference = select_weights_to_reset(compute_fisher_ratio(forget, full), **rule)
        sizes = {}
        for size in (size for size in args.sizes if size < len(inputs.retain)):
            scores = []
            for draw in range(args.draws):
                sampled = dataclasses.replace(inputs, retain=subsample(inputs.retain, size, draw), _fisher_cache={})
                sample = sampled.fisher("retain")
                scores.append(
                    agreement(select_weights_to_reset(compute_fisher_ratio(forget, sample), **rule), reference)
                )
            sizes[size] = scores
            print(
                f"seed {seed}: {size} of {len(inputs.retain)} retain rows: agreement {np.mean(scores):.3f} "
                f"(draws {', '.join(f'{score:.3f}' for score in scores)})"
            )
        results["seeds"][seed] = {"retain_rows": len(inputs.retain), "agreement": sizes}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "fisher_subsample.json").write_text(json.dumps(results, indent=2))
    plot(results, rule["reset_fraction"], output / "fisher_subsample.png")
    return 0


def plot(results: dict, share: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for seed, result in results["seeds"].items():
        sizes = sorted(result["agreement"])
        means = [np.mean(result["agreement"][size]) for size in sizes]
        axes.plot(sizes, means, marker="o", label=f"seed {seed} ({result['retain_rows']} retain rows)")
    axes.axhline(share, color="grey", linestyle=":", label="chance")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("retain rows in the Fisher sample")
    axes.set_ylabel("agreement with the full selection")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
