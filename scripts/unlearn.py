"""Run `hf-deepclean unlearn` as a script: the same file on one process, many processes, GPUs and machines.

    # one process (one GPU, or the CPU)
    python scripts/unlearn.py --model_name_or_path my-org/my-classifier --dataset_name my-org/my-data \
        --forget "ids:user_id:deletion_request.txt" --output_dir my-classifier-cleaned

    # every GPU of this machine (or 2 CPU processes on a machine without GPUs: gloo is chosen by itself)
    torchrun --nproc_per_node 2 scripts/unlearn.py --model_name_or_path ... --output_dir my-classifier-cleaned

    # as `accelerate config` set it up (multi-GPU, several machines: see docs/distributed.md)
    accelerate launch scripts/unlearn.py --model_name_or_path ... --output_dir my-classifier-cleaned
    accelerate launch --multi_gpu --num_processes 8 scripts/unlearn.py ...

Every argument of `hf-deepclean unlearn --help` applies; `--per_device_batch_size` is per process. Only the main
process writes the output folder and pushes it; a finished run exits with status 0 on every process.
"""

import sys

from hf_deepclean.cli import main


if __name__ == "__main__":
    sys.exit(main(["unlearn", *sys.argv[1:]]))
