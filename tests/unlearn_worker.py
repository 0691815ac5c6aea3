"""`scripts/unlearn.py` with a record of what each process did, for `test_distributed.py`.

    python unlearn_worker.py RECORD_DIR UNLEARN_ARGUMENTS...                                 # one process
    torchrun --standalone --nproc_per_node 2 unlearn_worker.py RECORD_DIR UNLEARN_ARGUMENTS...  # two

Runs the script unchanged (as `__main__`, its exit included) after wrapping three methods of the library so that
every process saves `RECORD_DIR/rank{N}.pt`: its selection masks, its weights after `run()`, the number of processes,
and how many times it wrote the output folder and pushed it. The library itself records none of this.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch

import hf_deepclean.pipeline.unlearn as unlearner_module
from hf_deepclean.pipeline.unlearn import DeepCleanUnlearner


SCRIPT = Path(__file__).parent.parent / "scripts" / "unlearn.py"


def record_processes(record_dir: str) -> None:
    calls = {"save": 0, "push": 0}
    run, save, push = DeepCleanUnlearner.run, DeepCleanUnlearner.save, unlearner_module.push_output_dir

    def counted_save(self, results):
        calls["save"] += 1
        return save(self, results)

    def counted_push(*args, **kwargs):
        calls["push"] += 1
        return push(*args, **kwargs)

    def recorded_run(self):
        results = run(self)
        model = self.accelerator.unwrap_model(self.model)
        record = {
            "rank": self.accelerator.process_index,
            "num_processes": self.accelerator.num_processes,
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "weights": {name: p.detach().cpu().clone() for name, p in model.named_parameters()},
            **calls,
        }
        torch.save(record, Path(record_dir) / f"rank{self.accelerator.process_index}.pt")
        return results

    DeepCleanUnlearner.run, DeepCleanUnlearner.save = recorded_run, counted_save
    unlearner_module.push_output_dir = counted_push


if __name__ == "__main__":
    record_dir, *arguments = sys.argv[1:]
    os.makedirs(record_dir, exist_ok=True)
    record_processes(record_dir)
    sys.argv = [str(SCRIPT), *arguments]
    runpy.run_path(str(SCRIPT), run_name="__main__")
