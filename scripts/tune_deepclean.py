"""Sweep DeepClean's settings on the benchmark scenarios (how the library defaults were chosen; see README).

    python scripts/tune_deepclean.py --output_dir tuning_output --seeds 0 1 2

Runs every baseline and, besides `deepclean` (the current defaults), one DeepClean variant per row of `GRID`, each
changing one or two settings of the defaults. Fisher sums are shared between variants; every method's time still
includes the Fisher passes it uses. Arguments are those of `hf-deepclean benchmark`.
"""

import sys

from hf_deepclean.baselines import BaselineConfig
from hf_deepclean.benchmark import BenchmarkArguments, format_benchmark_tables, run_benchmark, write_benchmark_report
from hf_deepclean.cli import parse_unlearn_args
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.hub import check_output_dir


GRID = {
    "frac0.05": {"reset_fraction": 0.05},
    "frac0.1": {"reset_fraction": 0.1},
    "frac0.3": {"reset_fraction": 0.3},
    "frac0.5": {"reset_fraction": 0.5},
    "per_param0.2": {"selection_scope": "per_parameter"},
    "per_param0.3": {"selection_scope": "per_parameter", "reset_fraction": 0.3},
    "gamma3": {"gamma": 3.0},
    "gamma10": {"gamma": 10.0},
    "zero0.2": {"reset": "zero"},
    "epochs1": {"repair_epochs": 1.0},
    "epochs4": {"repair_epochs": 4.0},
    "early_stop": {"early_stopping": True},
    "early_stop0.3": {"early_stopping": True, "reset_fraction": 0.3},
    "early_stop0.5": {"early_stopping": True, "reset_fraction": 0.5},
}


def main(argv: list[str]) -> int:
    args, method, baselines, _ = parse_unlearn_args(
        argv, "benchmark", (BenchmarkArguments, DeepCleanConfig, BaselineConfig)
    )
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    base = {key: value for key, value in vars(method).items()}
    variants = {f"dc_{name}": DeepCleanConfig(**{**base, **changes}) for name, changes in GRID.items()}
    results = run_benchmark(args, method, baselines, variants=variants)
    write_benchmark_report(results, args.output_dir, overwrite=args.overwrite_output_dir)
    print(format_benchmark_tables(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
