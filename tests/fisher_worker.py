"""Fisher diagonal under several processes: `torchrun --standalone --nproc_per_node 2 fisher_worker.py OUT`.

Run by `test_fisher.py::test_two_processes_match_one`. Each rank takes its shard of 13 reviews in batches of 4
(so Accelerate repeats samples to even out the last batches), the engine reduces, and rank 0 writes the result.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from conftest import build_tiny_bert, make_reviews
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from hf_deepclean.fisher import accumulate_fisher_sums


def review_loader(tokenizer, batch_size: int = 4) -> DataLoader:
    rows = make_reviews(13, seed=1)

    def collate(chunk):
        batch = dict(tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        return batch

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


def main(output: str) -> None:
    accelerator = Accelerator(cpu=True)
    model, tokenizer = build_tiny_bert()
    model, loader = accelerator.prepare(model, review_loader(tokenizer))
    sums, count = accumulate_fisher_sums(model, loader, accelerator=accelerator)
    if accelerator.is_main_process:
        sums["__count__"] = torch.tensor(float(count))
        sums["__processes__"] = torch.tensor(float(accelerator.num_processes))
        save_file({k: v.contiguous() for k, v in sums.items()}, output)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
    # Every rank is done once past the barrier; gloo's teardown at interpreter exit sometimes aborts or hangs on
    # this machine, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
