"""Memory per process of DeepClean under FSDP2: the arithmetic for large models, and a measurement on CPU.

    python scripts/fsdp_memory.py                 # the table for 8B and 70B models at 8 processes
    python scripts/fsdp_memory.py --measure       # peak memory of one unsharded process vs 2 FSDP processes (CPU)

The arithmetic counts, per element in scope, what each stage holds at its peak (docs/scale.md explains each term);
activations and one gathered layer come on top. The measurement runs the library's steps (both Fisher passes, top
30% selection, zero reset, one masked repair epoch) on a BERT of about 90M parameters, unsharded in this process and
sharded over two `torchrun` processes (built on the meta device and materialised after sharding, so no process
ever holds the whole model), and prints each process's peak resident memory above what it held before the model.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path


GIB = 2**30
MODELS = {  # parameters, and rank-16 LoRA elements on q, k, v, o, gate, up, down (docs/scale.md)
    "Llama-3-8B": (8_030_261_248, 41_943_040),
    "Llama-3-70B": (70_553_706_496, 207_093_760),
}


def per_element(weight_bytes: int, trained: bool) -> dict[str, int]:
    """Bytes per element in scope: the weights, then the Fisher stage's and the repair stage's own state."""
    fisher = 8 + 4 + 1  # two float32 sums, the float32 ratio, the bool mask
    repair = (weight_bytes + 8 + weight_bytes + 1) if trained else 0  # gradient, AdamW's float32 moments, anchor, mask
    return {"weights": weight_bytes, "fisher": fisher, "repair": repair}


def table(processes: int = 8, weight_bytes: int = 2) -> str:
    lines = [
        "| model | scope | elements in scope | per process, Fisher stage (GiB) | per process, repair stage (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name, (total, lora) in MODELS.items():
        for scope, in_scope in (("all", total), ("adapter", lora)):
            frozen = (total if scope == "adapter" else 0) * weight_bytes
            cost = per_element(weight_bytes, trained=True)
            fisher = frozen + in_scope * (cost["weights"] + cost["fisher"])
            repair = frozen + in_scope * (cost["weights"] + cost["repair"])
            lines.append(
                f"| {name} | {scope} | {in_scope:,} | {fisher / processes / GIB:.1f} | {repair / processes / GIB:.1f} |"
            )
    return "\n".join(lines)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(sharded: bool) -> None:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForSequenceClassification

    from hf_deepclean.fisher.engine import accumulate_fisher_sums
    from hf_deepclean.sharding import is_sharded, local_tensor, shard_model
    from hf_deepclean.unlearning.selection import compute_fisher_ratio
    from hf_deepclean.unlearning.top_k import Block, top_k_masks
    from hf_deepclean.unlearning.training import train_model

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=8, intermediate_size=3072, num_labels=2)
    before = _rss_bytes()
    if sharded:
        with torch.device("meta"):
            model = BertForSequenceClassification(config)
        shard_model(model, wrap=("BertLayer",))
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                local_tensor(p).normal_(0, 0.02)
            embeddings = model.bert.embeddings  # buffers left empty by the meta device
            embeddings.position_ids.copy_(
                torch.arange(embeddings.position_ids.shape[-1]).expand_as(embeddings.position_ids)
            )
            embeddings.token_type_ids.zero_()
    else:
        model = BertForSequenceClassification(config)
    ids = torch.randint(1000, 20000, (32, 64), generator=torch.Generator().manual_seed(1))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()}).with_format("torch")
    forget, retain = rows.select(range(8)), rows.select(range(8, 32))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    forget_sums, _ = accumulate_fisher_sums(model, DataLoader(forget, batch_size=8), params=params)
    retain_sums, _ = accumulate_fisher_sums(model, DataLoader(retain, batch_size=8), params=params)
    ratios = compute_fisher_ratio(forget_sums, retain_sums)
    del forget_sums, retain_sums
    total = sum(p.numel() for p in params.values())
    blocks = [Block(ratios[name], replicated=not is_sharded(p)) for name, p in params.items()]
    masks = dict(zip(params, top_k_masks(blocks, [round(0.3 * total)]), strict=True))
    del ratios, blocks
    with torch.no_grad():
        for name, p in params.items():
            local_tensor(p)[masks[name]] = 0
    per_process = 8 // accelerator.num_processes
    train_model(
        model, DataLoader(retain, batch_size=per_process), accelerator, epochs=1, learning_rate=1e-4, masks=masks
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"MEASURED sharded={sharded} process={accelerator.process_index} parameters={total:,} "
        f"peak_above_start_mib={(peak - before) / 2**20:.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="measure on CPU instead of printing the arithmetic")
    parser.add_argument("--worker", choices=["sharded", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args.worker == "sharded")
        return
    if not args.measure:
        print("bfloat16 weights, float32 Fisher sums and AdamW moments, 8 processes:\n")
        print(table())
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    script = str(Path(__file__).resolve())
    whole = subprocess.run([sys.executable, script, "--worker", "whole"], env=env, capture_output=True, text=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded = subprocess.run([*launch, script, "--worker", "sharded"], env=env, capture_output=True, text=True)
    for run in (whole, sharded):
        found = [line for line in run.stdout.splitlines() if line.startswith("MEASURED")]
        print("\n".join(found) if found else run.stdout[-2000:] + run.stderr[-2000:])


if __name__ == "__main__":
    main()
