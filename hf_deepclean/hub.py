"""Write the output folder atomically (push to the Hub builds on this folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DeepCleanError


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that would be clobbered or cannot be written, before any work is done."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise DeepCleanError(f"--output_dir: {str(path)!r} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DeepCleanError(
            f"--output_dir: {str(path)!r} exists and is not empty; pass --overwrite_output_dir to replace it."
        )
    parent = path.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeepCleanError(f"--output_dir: cannot write under {str(existing)!r} (permission denied).")
    return path


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `output_dir`; move it into place only if the block succeeds.

    A failure (exception, Ctrl-C) removes the temporary folder and leaves any existing `output_dir` untouched.
    With `overwrite`, the old folder is replaced only after the new one is complete.
    """
    path = check_output_dir(output_dir, overwrite)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent))
    try:
        # mkdtemp makes a private (0700) folder; the result should look like any folder the user creates
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        yield staging
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.absolute().parent))
            os.replace(path, old / "previous")
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
