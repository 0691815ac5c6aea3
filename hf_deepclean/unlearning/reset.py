"""The reset: what the selected elements become (fresh initial values, zeros, or a base model's values)."""

from __future__ import annotations

import copy as copy_module
import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..config import RESET_VALUES
from ..errors import DeepCleanError
from ..sharding import any_process, any_sharded, is_sharded, local_tensor, row_block


# Plain logging: these functions are pure tensor code, callable without an Accelerate state.
logger = logging.getLogger(__name__)

ResetMasks = dict[str, torch.Tensor]


def initial_values(model: nn.Module, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Fresh values for the named parameters, drawn by their own initialisation with `seed`.

    - Adapter weights (LoRA): the tuner layer's own `reset_lora_parameters`, as at adapter creation: LoRA's A
      matrices get fresh random values and B matrices zeros (embedding adapters the other way round), so a reset
      element of B switches its rank-one contribution off and a reset element of A is a new random direction
      that the repair can use once B is trained. Active copies of `modules_to_save` get the base model's
      `_init_weights`.
    - Everything else: a fresh model is built from the same config (its `_init_weights` is the initialisation the
      architecture was designed for); only the requested tensors are kept.
    """
    wanted = set(names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = _adapter_initial_values(model, wanted)
        rest = [name for name in names if name not in fresh]
        if rest:
            fresh_params = dict(_unsharded_class(model)(model.config).named_parameters())
            fresh.update({name: fresh_params[name].detach() for name in rest})
    return {name: fresh[name].to(dtype=dict(model.named_parameters())[name].dtype) for name in names}


def _unsharded_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 gives a sharded model a subclass of it and `FSDPModule`."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return next(base for base in type(model).__bases__ if base is not FSDPModule)
    return type(model)


def _adapter_initial_values(model: nn.Module, wanted: set[str]) -> dict[str, torch.Tensor]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return {}
    fresh: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            base_ids = {id(p) for p in base.parameters()}
            own = {prefix + k: p for k, p in module.named_parameters() if id(p) not in base_ids}
            if not wanted & set(own):
                continue
            if not hasattr(module, "reset_lora_parameters"):
                raise DeepCleanError(
                    f"--reset: got 'init', but the adapter layer {type(module).__name__} has no initialisation "
                    "routine; expected --reset zero for this adapter type."
                )
            # re-run the layer's initialisation in place, read the values, and put the trained ones back
            saved = {name: p.detach().clone() for name, p in own.items()}
            with torch.no_grad():
                for adapter in module.active_adapters:
                    module.reset_lora_parameters(adapter, True)
                for name, p in own.items():
                    fresh[name] = p.detach().clone()
                    p.copy_(saved[name])
        elif isinstance(module, ModulesToSaveWrapper):
            owner = model.get_base_model() if hasattr(model, "get_base_model") else model
            for adapter in module.active_adapters:
                copy = module.modules_to_save[adapter]
                names = {prefix + f"modules_to_save.{adapter}.{k}" for k, _ in copy.named_parameters()}
                if not wanted & names:
                    continue
                copy = copy_module.deepcopy(copy)
                for submodule in copy.modules():
                    owner._init_weights(submodule)
                for k, p in copy.named_parameters():
                    fresh[prefix + f"modules_to_save.{adapter}.{k}"] = p.detach()
    return {name: value for name, value in fresh.items() if name in wanted}


def reset_selected_weights(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    reset: str = "init",
    seed: int = 0,
    base_values: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Give the selected elements new values; every other element stays bit-for-bit as it is.

    Args:
        model: the model, changed in place.
        masks: `{parameter name: bool mask}` of the elements to reset.
        reset: `zero`: set them to zero (the paper); `init`: freshly initialised values (`initial_values` with
            `seed`); `base`: the values of `base_values`, the model the fine-tuning started from.
        seed: seed of the fresh values (`init`, and the fallback of `base`).
        base_values: with `reset="base"`, `{parameter name: tensor}` of the base model (only the selected
            parameters are read). A selected parameter it lacks, or holds with another shape (a classification
            head the base model does not have, say), gets the values `reset="init"` gives it with the same seed.

    Returns:
        The names of the selected parameters that fell back to fresh values under `reset="base"` (empty otherwise).
    """
    if reset not in RESET_VALUES:
        raise DeepCleanError(f"--reset: got {reset!r}; expected one of {', '.join(RESET_VALUES)}.")
    if reset == "base" and base_values is None:
        raise DeepCleanError("--reset: got 'base' without base values; expected --base_model_name_or_path.")
    params = dict(model.named_parameters())
    selected = {name: bool(mask.any()) for name, mask in masks.items()}
    if any_sharded(params):  # masks of FSDP-sharded weights hold this process's rows: agree on the names
        selected = any_process(selected)
    names = [name for name, chosen in selected.items() if chosen]
    fallback: list[str] = []
    if reset == "base":
        fallback = [
            name
            for name in names
            if name not in base_values or tuple(base_values[name].shape) != tuple(params[name].shape)
        ]
        mismatched = [name for name in fallback if name in base_values]
        if fallback:
            # said once, never silently: these parameters are not put back to the base model's values
            logger.info(
                f"--reset base: {len(fallback)} of {len(names)} selected parameters have no base value "
                f"({len(mismatched)} of them a base tensor of another shape), so they get freshly initialised "
                f"values: {', '.join(fallback[:5])}{', ...' if len(fallback) > 5 else ''}."
            )
        if len(fallback) == len(names):
            logger.warning(
                "--reset base: none of the selected parameters has a base value of the same shape; check that "
                "--base_model_name_or_path is the model the fine-tuning started from."
            )
    # drawn for every selected parameter, so that a fallback gets exactly what `init` would give it
    fresh = initial_values(model, names, seed) if reset == "init" or fallback else {}
    fallback_names = set(fallback)
    with torch.no_grad():
        for name in names:
            # a parameter sharded by FSDP2 changes in this process's rows only (`hf_deepclean.sharding`)
            param = local_tensor(params[name])
            mask = masks[name].to(param.device)
            if reset == "zero":
                replacement = torch.zeros_like(param)
            else:
                replacement = fresh[name] if reset == "init" or name in fallback_names else base_values[name]
                if is_sharded(params[name]):
                    start, stop = row_block(params[name], name)
                    replacement = replacement[start:stop]
            replacement = replacement.to(param.device, param.dtype)
            param.copy_(torch.where(mask, replacement, param))
    return fallback
