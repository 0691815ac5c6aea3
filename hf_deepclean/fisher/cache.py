"""Fisher sums saved to disk, so that a later deletion request costs one pass over the forget set.

Fisher sums are sums over samples, so with `S_all` computed once over the full training split at the original
weights, the retain Fisher of any forget set is `(S_all - S_forget) / (N - N_forget)`. The cache is a safetensors
file of the float32 sums, with metadata that says exactly what they were computed from; `check_fisher_cache`
refuses a cache whose weights, data, rows, Fisher type or scope differ from the run at hand.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DeepCleanError
from .engine import FisherDiagonal


CACHE_FORMAT = "hf_deepclean.fisher_sums/1"


@dataclass
class FisherCacheInfo:
    """What a cache's sums were computed from (stored as safetensors metadata, all strings there).

    Attributes:
        weights_sha256: `weights_fingerprint` of the model (every parameter and buffer, not only those in scope:
            the Fisher of the scope depends on all of them).
        dataset_fingerprint: the `datasets` fingerprint of the split.
        split: the split's name.
        rows_sha256: SHA-256 of the split name and the sorted row indices summed over (as the forget set's hash).
        num_rows: how many rows the split has.
        count: how many samples the sums cover.
        fisher_type: `empirical` or `true`.
        scope: `all` or `adapter`.
    """

    weights_sha256: str
    dataset_fingerprint: str
    split: str
    rows_sha256: str
    num_rows: int
    count: int
    fisher_type: str
    scope: str


@dataclass
class CachedFisherSums:
    """Cached sums over a whole training split, checked against the run that uses them.

    Attributes:
        sums: float32 sums of squared per-sample gradients, keyed by parameter name.
        info: what they were computed from (`info.count` samples).
        covers_forget_rows: whether the forget rows are among the cached ones (they are not when the forget set is
            a separate split): the retain sums are then `sums` less the forget sums.
    """

    sums: FisherDiagonal
    info: FisherCacheInfo
    covers_forget_rows: bool = True


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every parameter and buffer of `model`."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_fisher_sums(path: str | os.PathLike, sums: FisherDiagonal, info: FisherCacheInfo, overwrite: bool) -> Path:
    """Write the sums and their description atomically (a temporary file in the same folder, then a rename).

    Raises:
        DeepCleanError: if `path` exists and `overwrite` is false, or its folder cannot be written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DeepCleanError(f"--fisher_output: got {str(path)!r}; expected a path ending in .safetensors.")
    if path.exists() and not overwrite:
        raise DeepCleanError(
            f"--fisher_output: {str(path)!r} exists; pass --overwrite_output_dir to replace it, or choose another."
        )
    metadata = {"format": CACHE_FORMAT, **{k: str(v) for k, v in asdict(info).items()}}
    tensors = {name: value.detach().float().cpu().contiguous() for name, value in sums.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise DeepCleanError(f"--fisher_output: cannot write to {str(path.parent)!r}: {error.strerror}.") from None
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def load_fisher_sums(path: str | os.PathLike) -> tuple[FisherDiagonal, FisherCacheInfo]:
    """Read a cache written by `save_fisher_sums`.

    Raises:
        DeepCleanError: if the file is missing, not a safetensors file, or not a Fisher cache.
    """
    path = Path(path)
    if not path.is_file():
        raise DeepCleanError(f"--fisher_cache: got {str(path)!r}; expected a file written by `hf-deepclean fisher`.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        sums = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DeepCleanError(f"--fisher_cache: {str(path)!r} is not a readable safetensors file ({error}).") from None
    if metadata.get("format") != CACHE_FORMAT:
        raise DeepCleanError(
            f"--fisher_cache: {str(path)!r} has format {metadata.get('format')!r}; expected {CACHE_FORMAT!r} "
            "(written by `hf-deepclean fisher`)."
        )
    fields = FisherCacheInfo.__dataclass_fields__
    try:
        values = {k: (int(metadata[k]) if fields[k].type == "int" else metadata[k]) for k in fields}
    except (KeyError, ValueError) as error:
        raise DeepCleanError(f"--fisher_cache: {str(path)!r} lacks metadata {error}.") from None
    return sums, FisherCacheInfo(**values)


def check_fisher_cache(cached: FisherCacheInfo, expected: FisherCacheInfo, path: str) -> None:
    """Refuse a cache computed from anything other than this run's weights, training split and settings.

    `expected.count` is the number of rows of the training split: the cache must cover all of them.
    """
    checks = [
        ("weights_sha256", "model weights"),
        ("dataset_fingerprint", "training data"),
        ("split", "training split"),
        ("rows_sha256", "rows (a cache must cover every row of the training split)"),
        ("fisher_type", "--fisher_type"),
        ("scope", "--scope"),
    ]
    for field_name, meaning in checks:
        got, want = getattr(cached, field_name), getattr(expected, field_name)
        if got != want:
            shown = (got, want) if field_name in ("split", "fisher_type", "scope") else (got[:12], want[:12])
            raise DeepCleanError(
                f"--fisher_cache: {path!r} was computed for different {meaning} ({field_name} {shown[0]!r}, this "
                f"run {shown[1]!r}); expected a cache written by `hf-deepclean fisher` for this model and data."
            )
    if cached.count != expected.count:
        raise DeepCleanError(
            f"--fisher_cache: {path!r} covers {cached.count} samples; expected all {expected.count} rows."
        )


def retain_sums_from_cache(
    total: FisherDiagonal, count: int, forget: FisherDiagonal, forget_count: int
) -> tuple[FisherDiagonal, int]:
    """`(S_all - S_forget, N - N_forget)`; float32 round-off can leave tiny negatives, clamped to 0.

    Raises:
        DeepCleanError: if the scopes differ or nothing would be retained.
    """
    if set(total) != set(forget):
        missing = sorted(set(forget) ^ set(total))[:3]
        raise DeepCleanError(f"--fisher_cache: the cache and this run differ in parameters {missing}.")
    if count - forget_count < 1:
        raise DeepCleanError("--fisher_cache: the forget set covers the whole cached split; nothing is retained.")
    sums = {name: (total[name].to(forget[name].device) - forget[name]).clamp_(min=0) for name in forget}
    return sums, count - forget_count
