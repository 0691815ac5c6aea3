"""`--canaries`: planted secrets whose exposure measures how much a causal LM memorised."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from ..errors import DeepCleanError


@dataclass(frozen=True)
class Canaries:
    """Secret strings planted in the training data, and never-seen references of the same format.

    Attributes:
        texts: every canary, in file order.
        planted: `True` for the canaries that were in the training data.
        sha256: SHA-256 of the file's bytes (what reports record: never the texts).
    """

    texts: tuple[str, ...]
    planted: tuple[bool, ...]
    sha256: str

    @property
    def num_planted(self) -> int:
        return sum(self.planted)

    @property
    def num_references(self) -> int:
        return len(self.planted) - self.num_planted

    def dataset(self, text_column: str) -> Dataset:
        """The canaries as rows of `text_column`, for the run's collator."""
        return Dataset.from_dict({text_column: list(self.texts)})

    def record(self) -> dict[str, Any]:
        return {"planted": self.num_planted, "references": self.num_references, "sha256": self.sha256}


def load_canaries(path: str) -> Canaries:
    """Read a canary file: JSON lines, one object per canary, `{"text": str, "planted": bool}`.

    At least one planted canary and two never-seen ones are needed (each never-seen canary is ranked among the
    others to give the never-seen level). Error messages give line numbers, never the text of a canary.

    Raises:
        DeepCleanError: naming --canaries, for an unreadable or malformed file.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DeepCleanError(f"--canaries: cannot read {path!r} ({type(error).__name__}).") from None
    texts, planted = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("text"), str)
            or not entry["text"].strip()
            or not isinstance(entry.get("planted"), bool)
        ):
            raise DeepCleanError(
                f"--canaries: line {number} of {path!r} is not a JSON object with a non-empty string `text` and a "
                'boolean `planted`; expected JSON lines such as {"text": "my PIN is 4 8 1 9 2 7", "planted": true}.'
            )
        texts.append(entry["text"])
        planted.append(entry["planted"])
    canaries = Canaries(tuple(texts), tuple(planted), hashlib.sha256(raw).hexdigest())
    if canaries.num_planted < 1 or canaries.num_references < 2:
        raise DeepCleanError(
            f"--canaries: {path!r} has {canaries.num_planted} planted and {canaries.num_references} never-seen "
            "canaries; expected at least 1 planted and 2 never-seen ones."
        )
    return canaries
