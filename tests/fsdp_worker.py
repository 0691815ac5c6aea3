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
from conftest import build_tiny_bert, build_tiny_gpt2, make_reviews
from fisher_worker import review_loader, token_loader
from safetensors.torch import save_file

from hf_deepclean.fisher.engine import accumulate_fisher_sums
from hf_deepclean.sharding import full_state_dict, is_sharded, local_tensor, row_block, shard_model
from hf_deepclean.unlearning.selection import compute_fisher_ratio
from hf_deepclean.unlearning.top_k import Block, top_k_masks
from hf_deepclean.unlearning.training import train_model


def clean_tiny_bert(accelerator, sharded: bool, batch_size: int) -> tuple[dict, dict, dict]:
    """DeepClean's steps on a tiny BERT, from the library's functions: Fisher sums of 4 forget and 12 retain
    reviews (every process runs every row), the top 30% of ratios, zero reset, two masked repair epochs.

    Returns:
        `(original, cleaned, masks)`: whole state dicts before and after, and the whole masks (on every process).
    """
    from datasets import Dataset

    model, tokenizer = build_tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    if sharded:
        shard_model(model, wrap=("BertLayer",))
    rows = Dataset.from_list(make_reviews(16, seed=2))
    forget, retain = rows.select(range(4)), rows.select(range(4, 16))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    forget_sums, _ = accumulate_fisher_sums(model, review_loader(tokenizer, forget), params=params)
    retain_sums, _ = accumulate_fisher_sums(model, review_loader(tokenizer, retain), params=params)
    ratios = compute_fisher_ratio(forget_sums, retain_sums)
    total = sum(p.numel() for p in params.values())
    blocks = [Block(ratios[name], replicated=not is_sharded(p)) for name, p in params.items()]
    masks = dict(zip(params, top_k_masks(blocks, [round(0.3 * total)]), strict=True))
    with torch.no_grad():
        for name, p in params.items():
            local_tensor(p)[masks[name]] = 0
    train_model(
        model, review_loader(tokenizer, retain, batch_size), accelerator, epochs=2, learning_rate=1e-3, masks=masks
    )
    cleaned = full_state_dict(model)
    whole_masks = {}
    for name, p in params.items():
        if is_sharded(p):
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, masks[name])
            whole_masks[name] = torch.cat(parts)
        else:
            whole_masks[name] = masks[name]
    return original, cleaned, whole_masks


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
    from accelerate import Accelerator

    _, cleaned, masks = clean_tiny_bert(Accelerator(cpu=True), sharded=True, batch_size=2)
    tensors.update({f"cleaned.{k}": v.contiguous() for k, v in cleaned.items()})
    tensors.update({f"mask.{k}": v.contiguous() for k, v in masks.items()})
    save_file(tensors, f"{output}.rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
