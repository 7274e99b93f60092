"""Argument checks shared by the package's constructors and command lines."""

from __future__ import annotations

import argparse
from typing import Any


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Returns ``value`` when it is an int (not a bool) of at least ``minimum``; else raises ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_decay(decay: Any) -> float:
    """The affinity's EMA rate as a float in (0, 1]; else raises ``ValueError``."""
    if not 0.0 < float(decay) <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    return float(decay)


def positive_int_arg(text: str) -> int:
    """``type=`` of an argparse flag that takes a positive integer (one clear error line otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
