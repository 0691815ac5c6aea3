"""Follow DeepClean's repair on a digits scenario: the benchmark's metrics every quarter epoch (docs/benchmark.md, "Random
subsets stay hard").

    python scripts/repair_trajectory.py --scenario digits_random --seed 0 --reset_fractions 0.2 0.5 --repair_epochs 6

Trains the scenario's original and retrained models as the benchmark does, then for each reset share selects and
re-initialises the top share of elements by Fisher ratio and repairs them at `--learning_rate`, evaluating forget,
retain and held-out rows (and `avg_gap` to the retrained model) every quarter epoch. Prints one line per check.
"""

import argparse
import logging
import sys

from accelerate.utils import set_seed

from hf_deepclean.bench.baselines import BaselineConfig, retrain
from hf_deepclean.bench.benchmark import train_original
from hf_deepclean.bench.scenarios import DIGITS_SCENARIOS, build_digits_scenario
from hf_deepclean.config import DeepCleanConfig
from hf_deepclean.data.collators import make_dataloader
from hf_deepclean.distributed import default_accelerator
from hf_deepclean.evaluation.metrics import average_gap, evaluate_unlearning
from hf_deepclean.unlearning.repair import repair_selected_weights
from hf_deepclean.unlearning.reset import reset_selected_weights
from hf_deepclean.unlearning.selection import compute_fisher_ratio, select_weights_to_reset
from hf_deepclean.unlearning.training import TrainingSchedule


def main(argv: list[str]) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=DIGITS_SCENARIOS, default="digits_random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reset_fractions", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--repair_epochs", type=float, default=6.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--epochs", type=float, default=None, help="Training epochs of the models (default 40).")
    args = parser.parse_args(argv)

    accelerator = default_accelerator()
    scenario = build_digits_scenario(args.scenario, args.seed, args.epochs)
    set_seed(args.seed)
    inputs = train_original(scenario, accelerator, args.seed)
    original, forget, retain = inputs.model, inputs.forget, inputs.retain
    loaders = {
        split: make_dataloader(rows, scenario.collator, 64)
        for split, rows in (("forget", forget), ("retain", retain), ("test", scenario.test))
    }
    set_seed(args.seed)
    reference = evaluate_unlearning(retrain(inputs, DeepCleanConfig(), BaselineConfig()), loaders, accelerator)
    print(f"original avg_gap {average_gap(evaluate_unlearning(original, loaders, accelerator), reference):.2f}")
    ratios = compute_fisher_ratio(inputs.fisher("forget"), inputs.fisher("retain"))
    for share in args.reset_fractions:
        config = DeepCleanConfig(
            reset_fraction=share, repair_epochs=args.repair_epochs, learning_rate=args.learning_rate
        )
        model = inputs.copy_model()
        masks = select_weights_to_reset(ratios, reset_fraction=share, max_reset_fraction=config.max_reset_fraction)
        reset_selected_weights(model, masks, reset="init", seed=args.seed)
        prepared = accelerator.prepare_model(model, evaluation_mode=True)
        retain_loader = inputs.loader(retain, shuffle=True)
        steps_per_epoch = len(retain_loader)

        def report(step: int, share: float = share, prepared=prepared, steps_per_epoch=steps_per_epoch) -> bool:
            if step % max(1, steps_per_epoch // 4) == 0:
                m = evaluate_unlearning(prepared, loaders, accelerator)
                print(
                    f"share {share:g} epoch {step / steps_per_epoch:.2f}: avg_gap {average_gap(m, reference):.2f} "
                    f"forget {m['forget_accuracy']:.3f} retain {m['retain_accuracy']:.3f} "
                    f"test {m['test_accuracy']:.3f} mia_auc {m['mia_auc']:.3f} mia_efficacy {m['mia_efficacy']:.3f}",
                    flush=True,
                )
            return False

        set_seed(args.seed)
        repair_selected_weights(
            prepared,
            masks,
            retain_loader,
            accelerator,
            should_stop=report,
            **TrainingSchedule.repair_budget(config, inputs.batch_size).optimizer_arguments(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
