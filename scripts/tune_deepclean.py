"""Sweep DeepClean's settings on the benchmark scenarios (how the library defaults were chosen; see docs/decisions.md).

    python scripts/tune_deepclean.py --output_dir tuning_output --seeds 0 1 2 [--grid frac0.3 epochs4 ...]

Runs every baseline and, besides `deepclean` (the settings given, library defaults otherwise), one DeepClean variant
per entry of `GRID` (all, or those named by `--grid`), each changing one or two of those settings. A variant whose
name carries a share (`frac0.3`, `base0.2`, `zero0.2`) sets it; every other setting comes from the command line or
the current defaults, so a sweep made under older defaults is reproduced by passing them (docs/decisions.md names them). Fisher sums are
shared between variants; every method's time still includes the Fisher passes it uses. The other arguments are
those of `hf-deepclean benchmark`.
"""

import argparse
import logging
import sys

from hf_deepclean.bench.baselines import BaselineConfig
from hf_deepclean.bench.benchmark import BenchmarkArguments, run_benchmark
from hf_deepclean.bench.report import format_benchmark_tables, write_benchmark_report
from hf_deepclean.cli import parse_unlearn_args
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.hub.output import check_output_dir


GRID = {
    "frac0.05": {"reset_fraction": 0.05},
    "frac0.1": {"reset_fraction": 0.1},
    "frac0.3": {"reset_fraction": 0.3},
    "frac0.5": {"reset_fraction": 0.5},
    "per_param0.2": {"selection_scope": "per_parameter", "reset_fraction": 0.2},
    "per_param0.3": {"selection_scope": "per_parameter", "reset_fraction": 0.3},
    "gamma3": {"gamma": 3.0},
    "gamma10": {"gamma": 10.0},
    "zero0.2": {"reset": "zero", "reset_fraction": 0.2},
    "epochs1": {"repair_epochs": 1.0},
    "epochs4": {"repair_epochs": 4.0},
    "early_stop": {"early_stopping": True},
    "no_early_stop": {"early_stopping": False},
    "mia_stop": {"early_stopping": True, "early_stopping_criterion": "retain_and_mia"},
    "frac0.7": {"reset_fraction": 0.7, "max_reset_fraction": 0.7},
    "stop_tol0": {"early_stopping": True, "early_stopping_tolerance": 0.0},
    "early_stop0.3": {"early_stopping": True, "reset_fraction": 0.3},
    "early_stop0.5": {"early_stopping": True, "reset_fraction": 0.5},
    "frac0.3_epochs4": {"reset_fraction": 0.3, "repair_epochs": 4.0},
    "per_param0.3_epochs4": {"selection_scope": "per_parameter", "reset_fraction": 0.3, "repair_epochs": 4.0},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr1e-4": {"learning_rate": 1e-4},
    "lr3e-5": {"learning_rate": 3e-5},
    "lr3e-4_epochs4": {"learning_rate": 3e-4, "repair_epochs": 4.0},
    "lr1e-4_frac0.05": {"learning_rate": 1e-4, "reset_fraction": 0.05},
    "lr1e-4_frac0.3": {"learning_rate": 1e-4, "reset_fraction": 0.3},
    "gamma3_epochs4": {"gamma": 3.0, "repair_epochs": 4.0},
    "gamma10_epochs4": {"gamma": 10.0, "repair_epochs": 4.0},
    "epochs6": {"repair_epochs": 6.0},
    "lr2e-3": {"learning_rate": 2e-3},
    "frac0.3_lr2e-3": {"reset_fraction": 0.3, "learning_rate": 2e-3},
    "gamma10_lr1e-4": {"gamma": 10.0, "learning_rate": 1e-4},
    "epochs2": {"repair_epochs": 2.0},
    "epochs3": {"repair_epochs": 3.0},
    "epochs3_lr2e-3": {"repair_epochs": 3.0, "learning_rate": 2e-3},
    "frac0.3_epochs3": {"reset_fraction": 0.3, "repair_epochs": 3.0},
    "frac0.5_epochs3": {"reset_fraction": 0.5, "repair_epochs": 3.0},
    "frac0.5_epochs2": {"reset_fraction": 0.5, "repair_epochs": 2.0},
    "base0.2": {"reset": "base", "reset_fraction": 0.2},
    "base0.2_lr1e-4": {"reset": "base", "reset_fraction": 0.2, "learning_rate": 1e-4},
    "base0.5": {"reset": "base", "reset_fraction": 0.5},
    "base0.5_lr1e-4": {"reset": "base", "reset_fraction": 0.5, "learning_rate": 1e-4},
    "base0.2_early_stop": {"reset": "base", "reset_fraction": 0.2, "early_stopping": True},
    "base0.5_early_stop": {"reset": "base", "reset_fraction": 0.5, "early_stopping": True},
    "base0.2_stop_retain": {
        "reset": "base",
        "reset_fraction": 0.2,
        "early_stopping": True,
        "early_stopping_criterion": "retain",
    },
    "base0.5_stop_retain": {
        "reset": "base",
        "reset_fraction": 0.5,
        "early_stopping": True,
        "early_stopping_criterion": "retain",
    },
    "stop_retain": {"early_stopping": True, "early_stopping_criterion": "retain"},
    "frac0.5_lr2e-3": {"reset_fraction": 0.5, "learning_rate": 2e-3},
    "frac0.5_lr3e-3": {"reset_fraction": 0.5, "learning_rate": 3e-3},
    "frac0.5_epochs3_lr2e-3": {"reset_fraction": 0.5, "repair_epochs": 3.0, "learning_rate": 2e-3},
    "frac0.5_epochs3_lr3e-3": {"reset_fraction": 0.5, "repair_epochs": 3.0, "learning_rate": 3e-3},
    "frac0.5_epochs2_lr3e-3": {"reset_fraction": 0.5, "repair_epochs": 2.0, "learning_rate": 3e-3},
    "frac0.3_epochs2_lr3e-3": {"reset_fraction": 0.3, "repair_epochs": 2.0, "learning_rate": 3e-3},
}


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--grid", nargs="+", choices=sorted(GRID), default=list(GRID))
    known, argv = pre.parse_known_args(argv)
    args, method, baselines, _ = parse_unlearn_args(
        argv, "benchmark", (BenchmarkArguments, DeepCleanConfig, BaselineConfig)
    )
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    base = {key: value for key, value in vars(method).items()}
    variants = {f"dc_{name}": DeepCleanConfig(**{**base, **GRID[name]}) for name in known.grid}
    results = run_benchmark(args, method, baselines, variants=variants)
    write_benchmark_report(results, args.output_dir, overwrite=args.overwrite_output_dir)
    print(format_benchmark_tables(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
