"""Run `hf-deepclean benchmark` as a script, e.g. under Accelerate.

    python scripts/benchmark.py --output_dir benchmark_output
    accelerate launch scripts/benchmark.py --output_dir benchmark_output --seeds 0 1 2

Every argument of `hf-deepclean benchmark --help` applies.
"""

import sys

from hf_deepclean.cli import main


if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
