"""Value checks shared by configs, the command line and file readers: each raises a
``DeltatuneError`` that names the field, the value and what would be valid."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Union

from .core.errors import DeltatuneError

# Torch sizes are int64: an integer field beyond this cannot describe a tensor, and would fail
# deep inside an allocation with an OverflowError instead of naming the field.
INT_LIMIT = 2 ** 63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:       # an int too large for a float
        return False


_NUMERIC = (float, int, bool)


def _check_value(field: str, value: Any, hint: Any) -> None:
    """``value`` against the annotation ``hint`` for the numeric kinds a config stores (float,
    int, bool, optionally ``None``, and lists or dicts of them). Strings and pattern lists are
    left to ``_pattern_list`` and the method's ``validate``, which also accept a single pattern
    or an ``nn.Module`` class."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return
        if len(inner) == 1:
            _check_value(field, value, inner[0])
        return
    if hint is float:
        if not _is_number(value):
            raise DeltatuneError(f"{field} must be a number, got {value!r}")
        if not _finite(value):
            raise DeltatuneError(f"{field} must be a finite number, got {value!r}")
    elif hint is int:
        if not _is_int(value):
            raise DeltatuneError(f"{field} must be an int, got {value!r}")
        if abs(value) > INT_LIMIT:
            raise DeltatuneError(f"{field}={value} is out of range: must be at most {INT_LIMIT}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise DeltatuneError(f"{field} must be True or False, got {value!r}")
    elif origin is list and args and args[0] in _NUMERIC:
        if not isinstance(value, (list, tuple)):
            raise DeltatuneError(f"{field} must be a list, got {value!r}")
        for i, v in enumerate(value):
            _check_value(f"{field}[{i}]", v, args[0])
    elif origin is dict and len(args) == 2 and args[1] in _NUMERIC:
        if not isinstance(value, dict):
            raise DeltatuneError(f"{field} must be a dict, got {value!r}")
        for k, v in value.items():
            _check_value(f"{field}[{k!r}]", v, args[1])


def check(cond: bool, message: str) -> None:
    if not cond:
        raise DeltatuneError(message)


def check_choice(field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise DeltatuneError(f"{field}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_number(field: str, value: Any, *, kind: type = float, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    ok_type = _is_int(value) if kind is int else _is_number(value)
    if not ok_type:
        raise DeltatuneError(f"{field} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    if kind is int and abs(value) > INT_LIMIT:
        raise DeltatuneError(f"{field}={value} is out of range: must be at most {INT_LIMIT}")
    if kind is not int and not _finite(value):
        # NaN compares False with every bound, so it would pass the range checks below
        raise DeltatuneError(f"{field} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise DeltatuneError(f"{field}={value} is out of range: must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise DeltatuneError(f"{field}={value} is out of range: must be {'<' if high_open else '<='} {high}")
