"""Checks of argument values shared by every argument dataclass: each refuses a bad value with the one-line
`DeepCleanError` the CLI prints, naming the flag, the value received and what is accepted."""

from __future__ import annotations

import math
from typing import Any

from .errors import DeepCleanError


def check_fraction(name: str, value: float | None) -> None:
    """`--name` is None or a number in (0, 1]."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise DeepCleanError(f"--{name}: got {value!r}; expected a number in (0, 1].")


def check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    """`--name` is None or a finite number > 0 (>= 0 with `allow_zero`)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise DeepCleanError(f"--{name}: got {value!r}; expected a finite number {bound}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """`--name` is one of `choices`."""
    if value not in choices:
        raise DeepCleanError(f"--{name}: got {value!r}; expected one of {', '.join(choices)}.")
