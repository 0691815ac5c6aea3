"""FSDP2 on CPU: `torchrun --standalone --nproc_per_node N fsdp_worker.py OUT`, run by `test_fsdp.py`.

Every rank computes the Fisher sums of a tiny BERT classifier and a tiny GPT-2 (tied embeddings) unsharded, then
shards a copy with `hf_deepclean.sharding.shard_model` and computes them again; each rank saves its blocks and the
rows they cover, and the test compares them with the unsharded sums.
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
    save_file(tensors, f"{output}.rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
