"""Value checks every floor may use: integers, finite numbers, float32's range, booleans, and the rules of
the settings many configs share. Knows nothing of defenses, attacks or files."""
from __future__ import annotations

import argparse
import math
import typing

FLOAT32_MAX = 3.4028234663852886e38  # weights are float32: torch cannot take a larger lr or factor


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fits_float32(value: float) -> bool:
    """Not a finite number beyond float32's range (infinities and NaN are each check's own to judge)."""
    return not FLOAT32_MAX < abs(value) < float("inf")


# fields many configs share, checked for every defense: name → (test, what it must be)
COMMON_FIELDS = {
    "batch_size": (lambda v: is_integer(v) and v >= 1, "an integer ≥ 1"),
    "lr": (lambda v: is_number(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: is_number(v) and v >= 0, "a finite number ≥ 0"),
    "seed": (lambda v: is_integer(v) and v >= 0, "an integer ≥ 0"),
}

BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class NotABoolean(ValueError, argparse.ArgumentTypeError):
    """A value parse_bool refuses (argparse prints the message as is)."""


def parse_bool(value, name: str = "") -> bool:
    """The one boolean parser of every front end (options, YAML values, --set): true/false, yes/no, 1/0 in any
    case; anything else is refused, never read as false."""
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if key not in BOOLEANS:
        raise NotABoolean(f"{name + ' ' if name else ''}must be true or false (or yes/no, 1/0), got {value!r}")
    return BOOLEANS[key]


def is_bool_hint(hint) -> bool:
    """bool or Optional[bool]."""
    return hint is bool or (typing.get_origin(hint) is typing.Union and bool in typing.get_args(hint)
                            and all(a in (bool, type(None)) for a in typing.get_args(hint)))
