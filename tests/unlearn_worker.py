"""`scripts/unlearn.py` with a record of what each process did, for `test_distributed.py`.

    python unlearn_worker.py RECORD_DIR UNLEARN_ARGUMENTS...                                 # one process
    torchrun --standalone --nproc_per_node 2 unlearn_worker.py RECORD_DIR UNLEARN_ARGUMENTS...  # two

Runs the script unchanged (as `__main__`, its exit included) after wrapping three functions of the library so that
every process saves `RECORD_DIR/rank{N}.pt`: its selection masks, its weights after `unlearn()`, the number of processes,
and how many times it wrote the output folder and pushed it. The library itself records none of this.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch

import hf_deepclean.pipeline.unlearn as unlearn_module


SCRIPT = Path(__file__).parent.parent / "scripts" / "unlearn.py"


def record_processes(record_dir: str) -> None:
    calls = {"save": 0, "push": 0}
    unlearn, save, push = unlearn_module.unlearn, unlearn_module.save_output, unlearn_module.push_output_dir

    def counted_save(*args, **kwargs):
        calls["save"] += 1
        return save(*args, **kwargs)

    def counted_push(*args, **kwargs):
        calls["push"] += 1
        return push(*args, **kwargs)

    def recorded_unlearn(*args, **kwargs):
        run = unlearn(*args, **kwargs)
        accelerator = run.session.accelerator
        record = {
            "rank": accelerator.process_index,
            "num_processes": accelerator.num_processes,
            "masks": {name: mask.cpu() for name, mask in run.masks.items()},
            "weights": {name: p.detach().cpu().clone() for name, p in run.session.unwrapped_model.named_parameters()},
            **calls,
        }
        torch.save(record, Path(record_dir) / f"rank{accelerator.process_index}.pt")
        return run

    unlearn_module.unlearn, unlearn_module.save_output = recorded_unlearn, counted_save
    unlearn_module.push_output_dir = counted_push


if __name__ == "__main__":
    record_dir, *arguments = sys.argv[1:]
    os.makedirs(record_dir, exist_ok=True)
    record_processes(record_dir)
    sys.argv = [str(SCRIPT), *arguments]
    runpy.run_path(str(SCRIPT), run_name="__main__")
