"""FSDP2 on CPU: `torchrun --standalone --nproc_per_node N fsdp_worker.py OUT`, run by `test_fsdp.py`.

Every rank computes the Fisher sums of a tiny BERT classifier and a tiny GPT-2 (tied embeddings) unsharded, then
shards a copy with `hf_deepclean.sharding.shard_model` and computes them again; each rank saves its blocks and the
rows they cover, and the test compares them with the unsharded sums. Each rank also selects the top elements of
`selection_tensors()` from its row blocks of them (`hf_deepclean.unlearning.top_k`) and saves its masks.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import build_tiny_bert, build_tiny_gpt2
from fisher_worker import review_loader, token_loader
from safetensors.torch import save_file

from hf_deepclean.fisher.engine import accumulate_fisher_sums
from hf_deepclean.sharding import row_block, shard_model
from hf_deepclean.unlearning.top_k import Block, top_k_masks


def selection_tensors() -> list[torch.Tensor]:
    """Ratios with many ties (few distinct values) and zeros, in tensors of 1, 5, 7 and 2 rows."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(1, 3), (5,), (7, 2), (2, 4)]
    return [torch.randint(0, 4, shape, generator=generator).float() / 3 for shape in shapes]


SELECTIONS = {"global": ([0, 0, 0, 0], [9]), "per_tensor": ([0, 1, 2, 3], [1, 2, 5, 3])}


def selection_masks(world: int, rank: int) -> dict[str, torch.Tensor]:
    """The masks of this rank's row blocks (torch.chunk, as FSDP2 splits) for each selection; the last tensor is
    held whole by every rank (replicated)."""
    out = {}
    tensors = selection_tensors()
    for key, (groups, ks) in SELECTIONS.items():
        blocks = []
        for i, (tensor, group) in enumerate(zip(tensors, groups, strict=True)):
            replicated = i == len(tensors) - 1
            chunks = torch.chunk(tensor, world)
            rows = tensor if replicated else (chunks[rank] if rank < len(chunks) else tensor[:0])
            blocks.append(Block(rows, group=group, replicated=replicated))
        for i, mask in enumerate(top_k_masks(blocks, ks)):
            out[f"select.{key}.{i}"] = mask.contiguous()
    return out


def fisher_blocks(build, loader, fisher_type: str, wrap) -> dict[str, torch.Tensor]:
    whole, count = accumulate_fisher_sums(build(), loader(), fisher_type=fisher_type, seed=5)
    model = shard_model(build(), wrap=wrap)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    blocks, sharded_count = accumulate_fisher_sums(model, loader(), params=params, fisher_type=fisher_type, seed=5)
    assert sharded_count == count, (sharded_count, count)
    out = {}
    for name, block in blocks.items():
        start, stop = row_block(params[name], name)
        out[f"block.{name}"] = block
        out[f"whole.{name}"] = whole[name][start:stop].contiguous()
    return out


def main(output: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer = build_tiny_bert()
    tensors = {}
    for key, build, loader, fisher_type, wrap in (
        ("bert", lambda: build_tiny_bert()[0], lambda: review_loader(tokenizer), "empirical", ("BertLayer",)),
        ("gpt2", build_tiny_gpt2, token_loader, "true", ("GPT2Block",)),
    ):
        for name, value in fisher_blocks(build, loader, fisher_type, wrap).items():
            tensors[f"{key}.{name}"] = value
    tensors.update(selection_masks(dist.get_world_size(), rank))
    save_file(tensors, f"{output}.rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
