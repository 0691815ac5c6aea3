"""How `hf_deepclean` runs on one or many processes: the Accelerator it creates, the set-ups it refuses, which
process speaks, and how a multi-process run ends.

Every command (`unlearn`, `fisher`, `evaluate`, `benchmark`) takes its Accelerator from `default_accelerator()`, so
the same command runs unchanged under `python`, `torchrun` and `accelerate launch`. Under data parallelism each
process holds every weight, sums Fisher diagonals over its shard of the rows, and one reduce gives all of them the
same sums, hence the same selection. Under FSDP version 2 (`sharding_plan`) each process holds a block of rows of
every weight and of DeepClean's per-element state (`hf_deepclean.sharding`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, get_int_from_env, parse_flag_from_env
from datasets import Dataset
from datasets.distributed import split_dataset_by_node

from .errors import DeepCleanError


# Set-ups that split the weights across processes in a way DeepClean does not follow. FSDP version 2 is supported
# (`sharding_plan`); the others own the parameters or split them along axes the elementwise steps do not know.
SHARDED_TYPES = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.MEGATRON_LM: "Megatron-LM",
}
INSTEAD = (
    "shard with FSDP version 2 instead (`accelerate config`: FSDP, fsdp_version 2) or run data-parallel "
    "(multi-GPU or multi-CPU; or `torchrun`)"
)


@dataclass(frozen=True)
class ShardingPlan:
    """How the model is sharded with FSDP2 (`hf_deepclean.sharding.shard_model`), read from Accelerate's FSDP plugin
    (`accelerate launch --config_file fsdp.yaml`, or its `FSDP_*` environment variables).

    Attributes:
        wrap: class names of the modules that become FSDP units (the plugin's `transformer_cls_names_to_wrap`;
            `None`: the model's `_no_split_modules`).
        reshard_after_forward: free each unit's gathered weights after its forward pass (`FULL_SHARD`) or keep them
            until its backward pass (`SHARD_GRAD_OP`).
        mixed_precision: the plugin's `MixedPrecisionPolicy`, if any.
    """

    wrap: tuple[str, ...] | None
    reshard_after_forward: bool = True
    mixed_precision: object | None = None


def sharding_plan(accelerator: Accelerator) -> ShardingPlan | None:
    """The FSDP2 plan of the run, or `None` when the weights are not to be sharded.

    On GPUs Accelerate builds the FSDP plugin itself; on a machine without GPUs (where Accelerate runs FSDP set-ups as
    plain processes) the plugin is read from the same `FSDP_*` variables that `accelerate launch` sets.

    Raises:
        DeepCleanError: for FSDP version 1, parameter offloading to the CPU, a wrap policy other than by
            transformer block, or fp16 mixed precision.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and accelerator.num_processes > 1 and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
    if plugin is None:
        return None
    if plugin.fsdp_version != 2:
        raise DeepCleanError(
            f"accelerate: got FSDP version {plugin.fsdp_version}; expected fsdp_version: 2 (FSDP2, `fully_shard`), "
            "whose weights DeepClean shards block by block."
        )
    if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
        raise DeepCleanError(
            "accelerate: got fsdp_offload_params: true; expected false (the masked repair keeps its masks and "
            "anchors next to the weights on the device)."
        )
    if getattr(accelerator, "mixed_precision", "no") == "fp16":
        raise DeepCleanError(
            "accelerate: got mixed_precision fp16 with FSDP; expected bf16 or no (the masked repair steps its own "
            "optimizer, without a gradient scaler)."
        )
    wrap = plugin.transformer_cls_names_to_wrap
    policy = plugin.auto_wrap_policy
    if (
        policy is not None
        and wrap is None
        and getattr(policy, "__name__", str(policy)) != "transformer_auto_wrap_policy"
    ):
        raise DeepCleanError(
            f"accelerate: got the FSDP wrap policy {getattr(policy, '__name__', policy)}; expected "
            "TRANSFORMER_BASED_WRAP (FSDP units are the model's transformer blocks)."
        )
    return ShardingPlan(
        wrap=None if wrap is None else tuple([wrap] if isinstance(wrap, str) else wrap),
        reshard_after_forward=bool(plugin.reshard_after_forward),
        mixed_precision=plugin.mixed_precision_policy,
    )


def default_accelerator() -> Accelerator:
    """The run's Accelerator: Accelerate's default set-up (what `accelerate config` chose), except on a machine
    without GPUs under a multi-process launch (`torchrun`, `accelerate launch --multi_gpu`): there `Accelerator()`
    would run as independent single-process copies that each do all the work and write the output, so the CPU
    backend (gloo) is asked for explicitly.

    Raises:
        DeepCleanError: for a set-up whose split of the weights DeepClean does not follow (`check_parallelism`).
    """
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], 1) > 1
    accelerator = Accelerator(cpu=True) if launched and not torch.cuda.is_available() else Accelerator()
    check_parallelism(accelerator)
    return accelerator


def check_parallelism(accelerator: Accelerator) -> None:
    """Refuse, before any work, an Accelerate set-up whose split of the weights DeepClean does not follow.

    Accepted: one process, data parallelism (DDP over GPUs, gloo on CPUs) and FSDP version 2 (`sharding_plan`).
    Refused: DeepSpeed (any ZeRO stage: its engine owns the parameters, their fp32 master copies and the optimizer
    step, which the masked repair must control), Megatron-LM, tensor/context/sequence parallelism, and the FSDP
    settings `sharding_plan` refuses.

    Raises:
        DeepCleanError: one line that names the set-up and says what to use instead.
    """
    state = accelerator.state
    name = SHARDED_TYPES.get(accelerator.distributed_type)
    if name is None and getattr(state, "deepspeed_plugin", None) is not None:
        name = "DeepSpeed"
    if name == "DeepSpeed":
        stage = getattr(state.deepspeed_plugin, "zero_stage", None)
        name = f"DeepSpeed ZeRO stage {stage}" if stage is not None else name
        raise DeepCleanError(
            f"accelerate: got {name}, whose engine owns the weights, their master copies and the optimizer step, so "
            "the masked repair could not keep unselected weights unchanged; expected FSDP version 2 to shard the "
            "weights (`accelerate config`: FSDP, fsdp_version 2) or data parallelism."
        )
    parallelism = getattr(accelerator, "parallelism_config", None)
    if name is None and parallelism is not None:
        split = [kind for kind in ("tp", "cp", "sp") if getattr(parallelism, f"{kind}_enabled", False)]
        if split:
            name = f"parallelism_config with {', '.join(split)} > 1"
    if name is not None:
        raise DeepCleanError(
            f"accelerate: got {name}, which splits the weights in a way DeepClean does not follow; {INSTEAD}."
        )
    sharding_plan(accelerator)  # FSDP: version 2 with supported settings, or a one-line refusal


def process_shard(dataset: Dataset, accelerator: Accelerator | None) -> tuple[Dataset, int]:
    """This process's rows of `dataset` for a pass whose sums are reduced across processes, and the index in `dataset`
    of its first row.

    `datasets.distributed.split_dataset_by_node` gives each process one contiguous block and every row exactly once,
    so a sum over the shards is the sum over `dataset` with no repeated rows to drop (a loader prepared by Accelerate
    pads the last batches with repeats). The offset lets per-row randomness be seeded as on one process.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return dataset, 0
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(dataset) < world:  # `split_dataset_by_node` wants a row for every process: one row each, then none
        return dataset.select([rank] if rank < len(dataset) else []), min(rank, len(dataset))
    offset = sum(len(split_dataset_by_node(dataset, earlier, world)) for earlier in range(rank))
    return split_dataset_by_node(dataset, rank, world), offset


# where Accelerate keeps what `prepare` returned, for `save_state`/`load_state` (which hf_deepclean does not use)
PREPARED_REGISTRIES = ("_models", "_optimizers", "_schedulers", "_dataloaders")


@contextlib.contextmanager
def transient_preparations(accelerator: Accelerator) -> Iterator[None]:
    """What `accelerator.prepare*` registers inside the block is dropped from the Accelerator when the block ends.

    Accelerate keeps a reference to every model, optimizer, scheduler and dataloader it prepares. A run's Accelerator
    lives for the whole run (the benchmark's, for every scenario and seed), while loaders are prepared for every
    evaluation, monitor check and probe trial, and an optimizer (whose AdamW state is two copies of the trained
    weights) for every training: kept, they would pile up with the datasets and models they hold.
    `Accelerator.free_memory` drops them all, with a full `gc.collect()` that took a quarter of a second here, more
    than a probe trial of a small model; this drops just what the block prepared, and keeps what its caller had.
    """
    lengths = {name: len(getattr(accelerator, name)) for name in PREPARED_REGISTRIES}
    try:
        yield
    finally:
        for name, length in lengths.items():
            del getattr(accelerator, name)[length:]


def quiet_other_processes() -> None:
    """Called on every process but the first of each machine: silence the progress bars and info logs of `transformers`,
    `datasets` and `huggingface_hub` (as Hugging Face's example scripts do), so that a multi-process run shows each
    of them once per machine, like `hf_deepclean`'s own bars; its log lines come from the main process only."""
    import datasets
    import huggingface_hub
    import transformers

    for library in (datasets, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def end_processes() -> None:
    """Let a finished multi-process run end cleanly: wait for every process, then take the process group down.

    Without it, a process that exits while a peer's gloo connections are still open can abort at interpreter exit
    after all its work is done, and the launcher then reports the run as failed. Call it once, at the end of a
    program, on the path where every process finished; nothing happens on one process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = PartialState()  # the state of the run's Accelerator: its barrier suits the backend and device
        state.wait_for_everyone()
        state.destroy_process_group()
