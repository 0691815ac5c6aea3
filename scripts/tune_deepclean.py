"""Sweep DeepClean's settings on the benchmark scenarios (how the library defaults were chosen; see docs/decisions.md).

    python scripts/tune_deepclean.py --output_dir tuning_output --seeds 0 1 2 [--grid frac0.3 epochs4 ...]

Runs every baseline and, besides `deepclean` (the settings given, library defaults otherwise), one DeepClean variant
per entry of `GRID` (all, or those named by `--grid`), each changing one or two of those settings. A variant whose
name carries a share (`frac0.3`, `base0.2`, `zero0.2`) sets it; every other setting comes from the command line or
the current defaults, so a sweep made under older defaults is reproduced by passing them (docs/decisions.md names
them). Every variant runs the pipeline's `run_deepclean`, Fisher passes included, and is timed whole. Entries with
`max_retain_samples` read the retain Fisher from a seeded sample of that many rows (`--max_retain_samples` of
`hf-deepclean unlearn`). The other arguments are those of `hf-deepclean benchmark`.
"""

import argparse
import dataclasses
import logging
import math
import sys

from hf_deepclean.bench import baselines as baselines_module
from hf_deepclean.bench.baselines import BaselineConfig
from hf_deepclean.bench.benchmark import BenchmarkArguments, report_writer, run_benchmark
from hf_deepclean.bench.report import format_benchmark_tables
from hf_deepclean.cli import parse_unlearn_args
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.distributed import default_accelerator
from hf_deepclean.hub.output import check_output_dir
from hf_deepclean.unlearning import probe as probe_module


GRID = {
    "frac0.05": {"reset_fraction": 0.05},
    "frac0.1": {"reset_fraction": 0.1},
    "frac0.2": {"reset_fraction": 0.2},
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
    # 2026-12-06, issue 17 item 3 (docs/decisions.md): movement-weighted selection (on digits `base` resets to the
    # exact initial weights, which `init` also draws: the benchmark knows the start values only with `base`)
    "base": {"reset": "base"},
    "base_movement": {"reset": "base", "selection_weighting": "movement"},
    "base_moved0.25": {"reset": "base", "min_movement_quantile": 0.25},
    "movement": {"selection_weighting": "movement"},
    "moved0.5": {"min_movement_quantile": 0.5},
    "per_param": {"selection_scope": "per_parameter"},
    "global": {"selection_scope": "global"},
    "per_layer": {"selection_scope": "per_layer"},
    "ascent0.01": {"forget_ascent_weight": 0.01},
    "ascent0.03": {"forget_ascent_weight": 0.03},
    "ascent0.1": {"forget_ascent_weight": 0.1},
    "per_param_ascent0.01": {"selection_scope": "per_parameter", "forget_ascent_weight": 0.01},
    # issue 18 (docs/decisions.md): forget ascent inside the masked repair of an adapter
    "ascent0.3": {"forget_ascent_weight": 0.3},
    "ascent1": {"forget_ascent_weight": 1.0},
    "frac0.1_ascent0.1": {"reset_fraction": 0.1, "forget_ascent_weight": 0.1},
    # issue 18: SimNPO's bounded forget loss inside the masked repair instead of plain ascent (`--forget_loss simnpo`)
    "simnpo0.1": {"forget_ascent_weight": 0.1, "forget_loss": "simnpo"},
    "simnpo0.3": {"forget_ascent_weight": 0.3, "forget_loss": "simnpo"},
    "simnpo1": {"forget_ascent_weight": 1.0, "forget_loss": "simnpo"},
    "simnpo3": {"forget_ascent_weight": 3.0, "forget_loss": "simnpo"},
    "frac0.1_simnpo0.3": {"reset_fraction": 0.1, "forget_ascent_weight": 0.3, "forget_loss": "simnpo"},
    "frac0.1_simnpo1": {"reset_fraction": 0.1, "forget_ascent_weight": 1.0, "forget_loss": "simnpo"},
    # issue 18: a larger share of an adapter with a longer repair to bring its utility back
    "frac0.1_epochs8": {"reset_fraction": 0.1, "repair_epochs": 8.0},
    "frac0.2_epochs8": {"reset_fraction": 0.2, "repair_epochs": 8.0},
    "frac0.3_epochs8": {"reset_fraction": 0.3, "repair_epochs": 8.0},
    # issue 18: early stopping of a language model's repair on retain perplexity (off by default; 0.02 when asked for)
    "lm_stop0": {"early_stopping": True, "early_stopping_perplexity_tolerance": 0.0},
    "lm_stop0.02": {"early_stopping": True, "early_stopping_perplexity_tolerance": 0.02},
    "lm_stop0.05": {"early_stopping": True, "early_stopping_perplexity_tolerance": 0.05},
    "fisher_true": {"fisher_type": "true"},
    "lr5e-5": {"learning_rate": 5e-5},
    "lr3e-3": {"learning_rate": 3e-3},
    "lr1e-3": {"learning_rate": 1e-3},
    # issue 18, LM time: a shorter repair at the rate the probe picks on every full fine-tune facts run (no probe)
    "epochs2_lr3e-3": {"repair_epochs": 2.0, "learning_rate": 3e-3},
    # the retain Fisher on a seeded sample of that many rows (`--max_retain_samples` of `hf-deepclean unlearn`)
    "retain256": {"max_retain_samples": 256},
    "retain512": {"max_retain_samples": 512},
    "retain1024": {"max_retain_samples": 1024},
    "retain2048": {"max_retain_samples": 2048},
    "retain_all": {"max_retain_samples": 0},  # every retain row (the default before 2026-12-06)
    # probe settings (`probe_setting_runs` sets them for these entries): trials even when the reset barely raised the
    # retain loss (the behaviour before PROBE_MIN_DAMAGE, 2026-12-06); the repair from the reset weights rather than
    # from the chosen trial's (the behaviour before KEEP_CHOSEN_TRIAL, 2026-12-07)
    "probe_trials": {"probe": {"PROBE_MIN_DAMAGE": -math.inf}},
    "probe_restart": {"probe": {"KEEP_CHOSEN_TRIAL": False}},  # the default again since 2026-12-07
    "probe_keep": {"probe": {"KEEP_CHOSEN_TRIAL": True}},
    # the probe's separation and tie rules in percent of the loss only (before PROBE_DAMAGE_PROGRESS and
    # PROBE_DAMAGE_TOLERANCE, 2026-12-07)
    "probe_loss_rules": {"probe": {"PROBE_DAMAGE_PROGRESS": math.inf, "PROBE_DAMAGE_TOLERANCE": math.inf}},
}
# not a DeepCleanConfig field: `hf-deepclean unlearn` takes it as a data argument, and the benchmark's DeepClean
# reads the library's default, so `retain_sample_runs` passes it to the pipeline for the entries that set it
RETAIN_SAMPLES = "max_retain_samples"
PROBE_SETTINGS = "probe"


def retain_sample_runs(samples: dict[int, int]) -> None:
    """Make the benchmark's DeepClean read the retain Fisher from `samples[id(config)]` rows for those configs."""
    run = baselines_module.run_deepclean

    def run_deepclean(model, rows, config, *args, **kwargs):
        if id(config) in samples:
            rows = dataclasses.replace(rows, max_retain_samples=samples[id(config)])
        return run(model, rows, config, *args, **kwargs)

    baselines_module.run_deepclean = run_deepclean


def probe_setting_runs(settings: dict[int, dict[str, object]]) -> None:
    """Make the learning-rate probe module read `settings[id(config)]` (constants it reads at call time) during the
    runs of those configs."""
    run = baselines_module.run_deepclean

    def run_deepclean(model, rows, config, *args, **kwargs):
        changed = settings.get(id(config), {})
        defaults = {name: getattr(probe_module, name) for name in changed}
        for name, value in changed.items():
            setattr(probe_module, name, value)
        try:
            return run(model, rows, config, *args, **kwargs)
        finally:
            for name, value in defaults.items():
                setattr(probe_module, name, value)

    baselines_module.run_deepclean = run_deepclean


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
    variants, samples, probe_settings = {}, {}, {}
    for name in known.grid:
        entry = dict(GRID[name])
        rows = entry.pop(RETAIN_SAMPLES, None)
        probe = entry.pop(PROBE_SETTINGS, None)
        variants[f"dc_{name}"] = config = DeepCleanConfig(**{**base, **entry})
        if rows is not None:
            samples[id(config)] = rows or None  # 0: every retain row
        if probe:
            probe_settings[id(config)] = probe
    retain_sample_runs(samples)
    probe_setting_runs(probe_settings)
    accelerator = default_accelerator()  # the report is rewritten after every scenario and seed
    on_seed = report_writer(args, accelerator)
    results = run_benchmark(args, method, baselines, variants=variants, accelerator=accelerator, on_seed=on_seed)
    print(format_benchmark_tables(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
