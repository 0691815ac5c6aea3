"""Load the model to clean and its tokenizer or image processor; choose the parameters in scope."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from .config import TASKS, ModelArguments
from .errors import DeepCleanError


AUTO_MODEL_CLASSES = {
    "text-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """Read the model's `config.json` from the Hub or a local folder."""
    try:
        return AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.revision,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise DeepCleanError(
            f"--model_name_or_path: could not load {model_args.model_name_or_path!r} "
            f"(revision {model_args.revision!r}): {_first_line(error)}; expected a Hub model id or a local "
            "folder with config.json."
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

    Weights load from safetensors only: a pickle checkpoint can run arbitrary code.
    """
    config = config if config is not None else load_model_config(model_args)
    try:
        model = AUTO_MODEL_CLASSES[task].from_pretrained(
            model_args.model_name_or_path,
            config=config,
            revision=model_args.revision,
            trust_remote_code=model_args.trust_remote_code,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError) as error:
        raise DeepCleanError(
            f"--model_name_or_path: could not load {model_args.model_name_or_path!r} as a {task} model: "
            f"{_first_line(error)}; expected safetensors weights for this task."
        ) from error
    return model.eval()


def get_parameters_in_scope(model: nn.Module, scope: str = "all") -> dict[str, nn.Parameter]:
    """The parameters DeepClean may compute Fisher diagonals for and reset.

    Args:
        model: the (unwrapped) model.
        scope: `all` trainable parameters. Tied parameters appear once, under their first name.

    Returns:
        An ordered `{name: parameter}` mapping.
    """
    if scope != "all":
        raise DeepCleanError(f"--scope: got {scope!r}; expected all.")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise DeepCleanError("--scope: the model has no trainable parameters in scope 'all'.")
    return params
