"""How `hf_deepclean` runs on one or many processes: the Accelerator it creates, the set-ups it refuses, which
process speaks, and how a multi-process run ends.

Every command (`unlearn`, `fisher`, `evaluate`, `benchmark`) takes its Accelerator from `default_accelerator()`, so
the same command runs unchanged under `python`, `torchrun` and `accelerate launch`. DeepClean works on whole
replicas of the model (data parallelism): each process holds every weight, sums Fisher diagonals over its shard of
the rows, and one reduce gives all of them the same sums, hence the same selection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, get_int_from_env
from datasets import Dataset
from datasets.distributed import split_dataset_by_node

from .errors import DeepCleanError


# Set-ups that split the weights themselves across processes. DeepClean's Fisher ratio, selection, reset and masked
# repair are elementwise over whole tensors and need every weight on every process.
SHARDED_TYPES = {
    DistributedType.FSDP: "FSDP",
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.MEGATRON_LM: "Megatron-LM",
}
INSTEAD = (
    "run data-parallel instead (`accelerate config`: multi-GPU or multi-CPU, no FSDP/DeepSpeed; or `torchrun`), "
    "and if the model does not fit on one device, train a peft adapter and unlearn it with --scope adapter"
)


def default_accelerator() -> Accelerator:
    """The run's Accelerator: Accelerate's default set-up (what `accelerate config` chose), except on a machine
    without GPUs under a multi-process launch (`torchrun`, `accelerate launch --multi_gpu`): there `Accelerator()`
    would run as independent single-process copies that each do all the work and write the output, so the CPU
    backend (gloo) is asked for explicitly.

    Raises:
        DeepCleanError: for a set-up that shards the weights (see `check_data_parallel`).
    """
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], 1) > 1
    accelerator = Accelerator(cpu=True) if launched and not torch.cuda.is_available() else Accelerator()
    check_data_parallel(accelerator)
    return accelerator


def check_data_parallel(accelerator: Accelerator) -> None:
    """Refuse, before any work, an Accelerate set-up that shards the weights across processes.

    FSDP (any version or sharding strategy), DeepSpeed (any ZeRO stage: its engine owns the parameters and their
    fp32 master copies, which the masked repair must control), Megatron-LM and tensor/context/sharded-data
    parallelism are refused; one process and plain multi-process data parallelism (DDP over GPUs or gloo on CPUs)
    are accepted.

    Raises:
        DeepCleanError: one line that names the set-up and says what to use instead.
    """
    state = accelerator.state
    name = SHARDED_TYPES.get(accelerator.distributed_type)
    if name is None and getattr(state, "fsdp_plugin", None) is not None:
        name = "FSDP"
    if name is None and getattr(state, "deepspeed_plugin", None) is not None:
        name = "DeepSpeed"
    if name == "DeepSpeed":
        stage = getattr(state.deepspeed_plugin, "zero_stage", None)
        name = f"DeepSpeed ZeRO stage {stage}" if stage is not None else name
    parallelism = getattr(accelerator, "parallelism_config", None)
    if name is None and parallelism is not None:
        split = [kind for kind in ("dp_shard", "tp", "cp", "sp") if getattr(parallelism, f"{kind}_enabled", False)]
        if split:
            name = f"parallelism_config with {', '.join(split)} > 1"
    if name is not None:
        raise DeepCleanError(
            f"accelerate: got {name}, which splits the weights across processes; DeepClean needs every weight on "
            f"every process: {INSTEAD}."
        )


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
