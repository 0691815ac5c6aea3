"""Load the model to clean and its tokenizer or image processor; choose the parameters in scope."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.utils import logging as transformers_logging

from .config import TASKS, ModelArguments
from .errors import DeepCleanError


AUTO_MODEL_CLASSES = {
    "text-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
    "causal-lm": AutoModelForCausalLM,
    "seq2seq-lm": AutoModelForSeq2SeqLM,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__


def _looks_like_a_path(name: str) -> bool:
    """Not a Hub id (`NAME` or `ORG/NAME`): an absolute or relative path, which must then exist locally."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Read the model's `config.json` from the Hub or a local folder."""
    return _load_config(model_args.model_name_or_path, model_args.revision, model_args, "model_name_or_path")


def declared_base_model(model_args: ModelArguments) -> str | None:
    """The base model the checkpoint's model card declares (`base_model` in the card's metadata, the Hub's
    convention for fine-tunes), or None: no card, no such field, several bases (a merge), or a card that cannot be
    read (a Hub model offline with no cached card)."""
    name = model_args.model_name_or_path
    try:
        if os.path.isdir(os.path.expanduser(name)):
            card_path = os.path.join(os.path.expanduser(name), "README.md")
            if not os.path.isfile(card_path):
                return None
        else:
            card_path = hf_hub_download(name, "README.md", revision=model_args.revision)
        base = ModelCard.load(card_path).data.base_model
    except (OSError, ValueError, HfHubHTTPError):
        return None
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    return base if isinstance(base, str) and base.strip() else None


def load_base_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Read the `config.json` of `--base_model_name_or_path` (for `--reset base`), refusing a missing one early."""
    return _load_config(
        model_args.base_model_name_or_path, model_args.base_model_revision, model_args, "base_model_name_or_path"
    )


def _load_config(name: str, revision: str, model_args: ModelArguments, flag: str) -> PretrainedConfig:
    if _looks_like_a_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise DeepCleanError(
            f"--{flag}: got {name!r}, which is no folder; expected a local folder with config.json or a Hub model id "
            "(ORG/NAME)."
        )
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise DeepCleanError(
            f"--{flag}: could not load {name!r} (revision {revision!r}): {_first_line(error)}; expected a Hub model id "
            "or a local folder with config.json."
        ) from error


def infer_task(config: PretrainedConfig, requested: str = "auto", has_image_column: bool | None = None) -> str:
    """Pick the task from `--task`, else the config's `architectures`, else the dataset's columns."""
    if requested != "auto":
        return requested
    for architecture in config.architectures or []:
        if architecture.endswith("ForImageClassification"):
            return "image-classification"
        if architecture.endswith("ForSequenceClassification"):
            return "text-classification"
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):  # GPT-2's head class is `GPT2LMHeadModel`
            return "causal-lm"
        # T5, BART, Pegasus, mT5: `...ForConditionalGeneration`; Marian: `MarianMTModel`. Vision-language models share
        # the first suffix but are not encoder-decoders
        if getattr(config, "is_encoder_decoder", False) and architecture.endswith(
            ("ForConditionalGeneration", "MTModel")
        ):
            return "seq2seq-lm"
    if has_image_column is not None:
        return "image-classification" if has_image_column else "text-classification"
    raise DeepCleanError(
        f"--task: could not infer it from the model (architectures={config.architectures!r}); expected one of "
        f"{', '.join(TASKS)}."
    )


def load_processor(model_args: ModelArguments, task: str):
    """The model's tokenizer (text) or image processor (images)."""
    processor_class = AutoImageProcessor if task == "image-classification" else AutoTokenizer
    try:
        return processor_class.from_pretrained(
            model_args.model_name_or_path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        kind = "image processor" if task == "image-classification" else "tokenizer"
        raise DeepCleanError(
            f"--model_name_or_path: {model_args.model_name_or_path!r} has no loadable {kind}: {_first_line(error)}."
        ) from error


def load_model(model_args: ModelArguments, task: str, config: PretrainedConfig | None = None) -> nn.Module:
    """Load the model with its head for `task`, in float32 and eval mode.

    Weights load from safetensors only unless `--allow_pickle_weights`: a pickle checkpoint can run arbitrary code.
    """
    config = config if config is not None else load_model_config(model_args)
    model, _ = _load_pretrained(
        model_args.model_name_or_path, model_args.revision, model_args, task, config, "model_name_or_path"
    )
    return model


def _load_pretrained(
    name: str, revision: str, model_args: ModelArguments, task: str, config: PretrainedConfig, flag: str
) -> tuple[nn.Module, dict[str, Any]]:
    """`AUTO_MODEL_CLASSES[task].from_pretrained` with this package's safety settings; also returns the loading
    info (`missing_keys`: parameters the checkpoint lacks, freshly initialised by transformers)."""
    try:
        model, info = AUTO_MODEL_CLASSES[task].from_pretrained(
            name,
            config=config,
            revision=revision,
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=None if model_args.allow_pickle_weights else True,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as error:  # missing, truncated or corrupted weights
        raise DeepCleanError(
            f"--{flag}: could not load {name!r} as a {task} model: {_first_line(error)}; expected safetensors "
            "weights for this task (pickle weights load only with --allow_pickle_weights)."
        ) from error
    return model.eval(), info


def load_base_values(
    model_args: ModelArguments, task: str, names: Iterable[str], config: PretrainedConfig | None = None
) -> dict[str, torch.Tensor]:
    """The weights of `--base_model_name_or_path` (the model the fine-tuning started from) for `--reset base`.

    The base checkpoint is loaded with the same Auto class as the model to clean, so a bare encoder checkpoint
    (`BertModel`) lands under the names of the fine-tuned model (`bert.encoder...`) and a checkpoint of the very
    same class matches name for name. Parameters the checkpoint lacks (a new classification head, say), which
    transformers would initialise at random, are left out; the caller falls back to a fresh initialisation there.

    Args:
        model_args: the run's model arguments (`base_model_name_or_path`, `base_model_revision`, and the loading
            safety settings `trust_remote_code`, `allow_pickle_weights`).
        task: the task of the model to clean.
        names: the parameters whose base values are wanted (the selected ones); the rest is freed.
        config: the base model's config, if already loaded.

    Returns:
        `{name: float32 tensor on CPU}` for the wanted parameters the base checkpoint holds.
    """
    config = config if config is not None else load_base_model_config(model_args)
    # transformers reports the parameters it initialised itself (a head the base lacks) as a warning meant for
    # training; here they are left out and reported by the reset instead
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        base, info = _load_pretrained(
            model_args.base_model_name_or_path,
            model_args.base_model_revision,
            model_args,
            task,
            config,
            "base_model_name_or_path",
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    wanted, missing = set(names), set(info.get("missing_keys") or ())
    values = {
        name: p.detach().to("cpu", torch.float32)
        for name, p in base.named_parameters()
        if name in wanted and name not in missing
    }
    del base
    return values


def load_adapter(model: nn.Module, model_args: ModelArguments) -> nn.Module:
    """Load the peft adapter named by `--adapter_name_or_path` onto `model`, trainable (for the repair).

    Returns:
        The `PeftModel`; `model` itself when no adapter is asked for.
    """
    if model_args.adapter_name_or_path is None:
        return model
    from peft import PeftConfig, PeftModel

    try:
        adapter_config = PeftConfig.from_pretrained(
            model_args.adapter_name_or_path, revision=model_args.adapter_revision
        )
        if adapter_config.is_prompt_learning:
            # virtual-token embeddings live outside the model's layers: no weight of the model would be in scope
            raise DeepCleanError(
                f"--adapter_name_or_path: got {model_args.adapter_name_or_path!r}, a {adapter_config.peft_type.value} "
                "adapter, which has no weights in the model's layers (no trainable parameters in scope); expected an "
                "adapter of peft tuner layers such as LoRA."
            )
        adapted = PeftModel.from_pretrained(
            model,
            model_args.adapter_name_or_path,
            revision=model_args.adapter_revision,
            is_trainable=True,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise DeepCleanError(
            f"--adapter_name_or_path: could not load {model_args.adapter_name_or_path!r}: {_first_line(error)}; "
            "expected a peft adapter folder or Hub id (adapter_config.json and adapter weights)."
        ) from error
    return adapted.eval()


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merge a peft adapter into its base model's weights (`merge_and_unload`) for a plain full-model checkpoint.

    The base layers are changed in place: call it last, on a model that is not used as a `PeftModel` again.

    Returns:
        The base `transformers` model with the merged weights.

    Raises:
        DeepCleanError: when `model` carries no peft adapter.
    """
    if not hasattr(model, "merge_and_unload"):
        raise DeepCleanError(
            "--merge_adapter: the model carries no peft adapter to merge; pass --adapter_name_or_path, or drop "
            "--merge_adapter."
        )
    return model.merge_and_unload()


SCOPES = ("all", "adapter")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of the active peft adapters, selected structurally (not by matching names).

    These are the parameters held by peft tuner layers under their adapter containers (for LoRA: `lora_A`,
    `lora_B`, `lora_embedding_A`, `lora_embedding_B`, and DoRA's magnitude), for the active adapters, plus the
    active copies of `modules_to_save` (a classification head trained with the adapter, say). Only trainable
    ones count.

    Returns:
        An ordered `{name: parameter}` mapping; empty when the model carries no peft adapter (or peft is not
        installed, in which case it cannot carry one).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return {}
    selected: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for container_name in (*module.adapter_layer_names, *getattr(module, "other_param_names", ())):
                container = getattr(module, container_name, None)
                if not isinstance(container, nn.ModuleDict | nn.ParameterDict):
                    continue
                for adapter in module.active_adapters:
                    if adapter in container:
                        value = container[adapter]
                        members = [value] if isinstance(value, nn.Parameter) else list(value.parameters())
                        selected.update(id(p) for p in members)
        elif isinstance(module, ModulesToSaveWrapper):
            for adapter in module.active_adapters:
                if adapter in module.modules_to_save:
                    selected.update(id(p) for p in module.modules_to_save[adapter].parameters())
    return {name: p for name, p in model.named_parameters() if id(p) in selected and p.requires_grad}


def get_parameters_in_scope(model: nn.Module, scope: str = "all") -> dict[str, nn.Parameter]:
    """The parameters DeepClean may compute Fisher diagonals for and reset.

    Args:
        model: the (unwrapped) model.
        scope: `all` trainable parameters, or `adapter`: the trainable weights of the active peft adapters
            (`adapter_parameters`). Tied parameters appear once, under their first name.

    Returns:
        An ordered `{name: parameter}` mapping.

    Raises:
        DeepCleanError: for an unknown scope, a model without adapter under `adapter`, or an empty scope.
    """
    if scope not in SCOPES:
        raise DeepCleanError(f"--scope: got {scope!r}; expected one of {', '.join(SCOPES)}.")
    if scope == "adapter":
        params = adapter_parameters(model)
        if not params:
            raise DeepCleanError(
                "--scope: got 'adapter', but the model has no trainable peft adapter weights; pass "
                "--adapter_name_or_path, or use --scope all."
            )
        return params
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise DeepCleanError("--scope: the model has no trainable parameters in scope 'all'.")
    return params
