"""Run `hf-deepclean benchmark` as a script: the same file on one process, many processes, GPUs and machines.

    python scripts/benchmark.py --output_dir benchmark_output
    torchrun --nproc_per_node 2 scripts/benchmark.py --output_dir benchmark_output --seeds 0 1 2
    accelerate launch scripts/benchmark.py --output_dir benchmark_output --seeds 0 1 2

Every argument of `hf-deepclean benchmark --help` applies; `--per_device_batch_size` is per process. Only the main
process writes the report; a finished run exits with status 0 on every process.
"""

import sys

from hf_deepclean.cli import main


if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
