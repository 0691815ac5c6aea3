"""The digits scenario shared by the demo and the benchmark: scikit-learn's 8x8 digits as a `DatasetDict`, a
70k-parameter ViT built from config, and its training recipe."""

from __future__ import annotations

import numpy as np
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from ..data.collators import ClassificationCollator, Columns, make_dataloader
from ..unlearning.training import train_model


DIGIT_NAMES = [str(d) for d in range(10)]


def build_digits_dataset(seed: int = 0, test_size: float = 0.2) -> DatasetDict:
    """scikit-learn's 1,797 8x8 digits as a `DatasetDict` of RGB images with a `ClassLabel`, split train/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    images = [PILImage.fromarray(image, mode="L").convert("RGB") for image in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def build_digits_model(seed: int = 0) -> tuple[ViTForImageClassification, ViTImageProcessor]:
    """A 70k-parameter ViT (2 layers, hidden 64, 2x2 patches) and its image processor, from config."""
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label=dict(enumerate(DIGIT_NAMES)),
        label2id={name: i for i, name in enumerate(DIGIT_NAMES)},
        architectures=["ViTForImageClassification"],
    )
    set_seed(seed)
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def train_digits_model(
    dataset: Dataset, processor, accelerator: Accelerator, *, epochs: int, seed: int, desc: str
) -> ViTForImageClassification:
    """Train the demo ViT from its seeded initialisation on `dataset` until it fits it."""
    model, _ = build_digits_model(seed)
    model.to(accelerator.device)
    collator = ClassificationCollator(processor, Columns(label="label", image="image"), label_map=None)
    loader = make_dataloader(dataset, collator, batch_size=32, shuffle=True, seed=seed)
    train_model(
        model,
        loader,
        accelerator,
        epochs=epochs,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_ratio=0.05,
        lr_scheduler_type="cosine",
        desc=desc,
    )
    return model
