"""The output folder: refuse to overwrite by accident, and write it atomically (a temporary sibling renamed into
place, with an existing folder put back if anything fails or the run is interrupted)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DeepCleanError


# standard logging: a push runs on the main process only, and `hf-deepclean push` has no Accelerate state at all
logger = logging.getLogger(__name__)

CONFIG_NAME = "deepclean_config.json"
RESULTS_NAME = "deepclean_results.json"


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that would be clobbered or cannot be written, before any work is done."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise DeepCleanError(f"--output_dir: {str(path)!r} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DeepCleanError(
            f"--output_dir: {str(path)!r} exists and is not empty; pass --overwrite_output_dir to replace it."
        )
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    accepted = "expected a folder that can be created and written"
    if not existing.is_dir():
        raise DeepCleanError(f"--output_dir: cannot write {str(path)!r}: {str(existing)!r} is a file; {accepted}.")
    # a real attempt: permission bits say nothing for root, read-only file systems or full disks
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=existing))
    except OSError as error:
        raise DeepCleanError(
            f"--output_dir: cannot write {str(path)!r}: {error.strerror or error} under {str(existing)!r}; {accepted}."
        ) from None
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
    old = None
    try:
        # mkdtemp makes a private (0700) folder; the result should look like any folder the user creates
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.absolute().parent))
            os.replace(path, old / "previous")
        os.replace(staging, path)
    except BaseException:
        # signals wait until the old folder is back in place and the temporary ones are gone (a second Ctrl-C
        # must not strand them); the pending one is raised when they are unblocked
        with _signals_deferred():
            if old is not None and (old / "previous").exists() and not path.exists():
                os.replace(old / "previous", path)
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        with _signals_deferred():
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration of the block (main thread, POSIX); delivered after it."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
