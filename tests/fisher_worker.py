"""Fisher diagonal under several processes: `torchrun --standalone --nproc_per_node 2 fisher_worker.py OUT`.

Run by `test_fisher.py::test_two_processes_match_one`. Each rank takes its block of 13 reviews
(`hf_deepclean.distributed.process_shard`), the engine reduces, and rank 0 writes the result.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from conftest import build_tiny_bert, build_tiny_gpt2, make_reviews
from datasets import Dataset
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from hf_deepclean.distributed import process_shard
from hf_deepclean.fisher.engine import accumulate_fisher_sums


def review_rows() -> Dataset:
    return Dataset.from_list(make_reviews(13, seed=1))


def review_loader(tokenizer, rows: Dataset | None = None, batch_size: int = 4) -> DataLoader:
    def collate(chunk):
        batch = dict(tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        return batch

    return DataLoader(review_rows() if rows is None else rows, batch_size=batch_size, collate_fn=collate)


def token_rows() -> Dataset:
    """13 sequences of 6 random tokens for a tiny GPT-2, whose true Fisher samples a label per token."""
    ids = torch.randint(0, 11, (13, 6), generator=torch.Generator().manual_seed(3))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def token_loader(rows: Dataset | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(token_rows() if rows is None else rows, batch_size=batch_size)


def main(output: str) -> None:
    accelerator = Accelerator(cpu=True)
    model, tokenizer = build_tiny_bert()
    # each process its own block of rows (7 and 6 of the 13), the engine reduces the sums and counts
    reviews, _ = process_shard(review_rows(), accelerator)
    sums, count = accumulate_fisher_sums(model, review_loader(tokenizer, reviews), accelerator=accelerator)
    # sampled labels are seeded by the row's index in the whole data, so they match one process too
    tokens, first_index = process_shard(token_rows(), accelerator)
    true_sums, _ = accumulate_fisher_sums(
        build_tiny_gpt2(),
        token_loader(tokens),
        fisher_type="true",
        seed=5,
        accelerator=accelerator,
        first_index=first_index,
    )
    sums.update({f"true/{name}": values for name, values in true_sums.items()})
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
