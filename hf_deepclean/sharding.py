"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): which block of a tensor this process holds.

FSDP2 stores each parameter as a `DTensor` split along its first axis into one block per process, as `torch.chunk`
splits it: blocks of `ceil(rows / world)` rows, the last ones shorter or empty. DeepClean's per-element state (Fisher
sums, ratios, masks) follows the same layout, so that each process keeps only the block of the parameters it owns.
Any other layout (tensor parallelism, a 2-D mesh, a `Shard(1)` placement) is refused rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.distributed.tensor import DTensor, Shard

from .errors import DeepCleanError


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a distributed tensor (an FSDP2 parameter or gradient) rather than a whole local one."""
    return isinstance(tensor, DTensor)


def any_sharded(params: Mapping[str, torch.Tensor]) -> bool:
    """Whether any of `params` is sharded; a mix of sharded and whole parameters is handled per parameter."""
    return any(is_sharded(p) for p in params.values())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's block of a sharded tensor (a view of its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def row_block(tensor: torch.Tensor, name: str = "parameter") -> tuple[int, int]:
    """`(start, stop)`: the rows along the first axis that this process holds of `tensor` (all of them if whole).

    Raises:
        DeepCleanError: for a layout other than FSDP2's one-axis `Shard(0)` on a one-dimensional mesh.
    """
    if not is_sharded(tensor):
        return 0, tensor.shape[0] if tensor.dim() else 1
    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise DeepCleanError(
            f"FSDP: {name!r} is laid out as {placements} on a {mesh.ndim}-D mesh; expected FSDP2's Shard(0) on one "
            "axis (fully_shard without tensor parallelism or HSDP)."
        )
    rows, world, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(rows / world)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    held = tensor.to_local().shape
    if tuple(held) != (stop - start, *tensor.shape[1:]):
        raise DeepCleanError(
            f"FSDP: {name!r} holds a block of shape {tuple(held)} on process {rank}; expected rows {start}:{stop} of "
            f"{tuple(tensor.shape)} (torch.chunk layout over {world} processes)."
        )
    return start, stop


def shard_model(
    model: torch.nn.Module,
    *,
    wrap: tuple[str, ...] | None = None,
    reshard_after_forward: bool = True,
    mixed_precision: object | None = None,
):
    """Shard `model` in place with FSDP2 (`fully_shard`) over the default process group: one unit per module whose
    class is named in `wrap` (default: the model's `_no_split_modules`, its transformer blocks), then the root.

    `mixed_precision` is a `torch.distributed.fsdp.MixedPrecisionPolicy` (Accelerate's plugin builds one from
    `mixed_precision`), or None for the weights' own dtype.

    Returns:
        The model (now an `FSDPModule`, its parameters `DTensor`s split by rows across processes).

    Raises:
        DeepCleanError: if no module of the model has a class named in `wrap`.
    """
    from torch.distributed.fsdp import fully_shard

    names = tuple(wrap if wrap is not None else getattr(model, "_no_split_modules", None) or ())
    units = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if not units:
        raise DeepCleanError(
            f"FSDP: no module of {type(model).__name__} has a class in {list(names)}; expected the names of its "
            "transformer blocks (fsdp_transformer_layer_cls_to_wrap)."
        )
    options = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        options["mp_policy"] = mixed_precision
    for module in units:
        fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is sharded (FSDP2)."""
    return any(is_sharded(p) for p in model.parameters())


def gather_rows(block: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `block` holds this process's rows, in the layout of `like` (a collective: every
    process calls it, and every process gets the whole tensor); `block` itself when `like` is not sharded."""
    if not is_sharded(like):
        return block
    return like_parameter(block, like).full_tensor()


def like_parameter(block: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`block` (this process's rows, e.g. a mask) in the layout of `param`: a `DTensor` split as `param` is when
    `param` is sharded, so that it combines elementwise with the parameter and its gradient; else `block` itself."""
    if not is_sharded(param):
        return block
    return DTensor.from_local(block, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a model sharded by FSDP2, gathered on the CPU of the main process (the others get an
    empty dict: a collective, every process calls it); a model that is not sharded gives its own `state_dict()`."""
    if not any(is_sharded(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def any_process(flags: Mapping[str, bool]) -> dict[str, bool]:
    """`{name: flag}` made true wherever any process's flag is (one `all_reduce`), so that every process decides
    alike from its own blocks (which parameters train, say); unchanged on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not flags:
        return dict(flags)
    values = torch.tensor([int(flag) for flag in flags.values()], dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {name: bool(value) for name, value in zip(flags, values.tolist(), strict=True)}


class WholeTensors(Mapping):
    """`{name: whole tensor}` over row blocks of sharded parameters, each gathered when read (bool blocks as bytes,
    which every backend gathers) and not kept: one whole tensor at a time. Reading is a collective: every process
    must read the same names in the same order."""

    def __init__(self, blocks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]):
        self.blocks, self.params = blocks, params

    def __getitem__(self, name: str) -> torch.Tensor:
        block = self.blocks[name]
        if block.dtype == torch.bool:
            return gather_rows(block.to(torch.uint8), self.params[name]).bool()
        return gather_rows(block, self.params[name])

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)
