"""Checks shared by the model configs: read a diffusers/transformers config.json, refuse what sdjax can't build.

Every error names the component and the field, says what the file has and what sdjax supports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn


class UnsupportedConfigError(ValueError):
    """A config.json asks for an architecture sdjax does not implement."""


def _fail(component: str, field: str, value: Any, allowed: str) -> NoReturn:
    raise UnsupportedConfigError(
        f"{component} config field '{field}' = {value!r} is not supported by sdjax (supported: {allowed})")


def check_fixed(d: dict[str, Any], fixed: dict[str, Any], component: str) -> None:
    """Fields that must be absent or hold exactly the value sdjax implements."""
    for field, want in fixed.items():
        if field in d and d[field] != want and not (want is None and d[field] in ((), [])):
            _fail(component, field, d[field], repr(want) if want is not None else "null/absent")


def check_choices(d: dict[str, Any], field: str, allowed: Iterable[str], component: str) -> None:
    allowed = tuple(allowed)
    for value in d.get(field) or ():
        if value not in allowed:
            _fail(component, field, value, ", ".join(allowed))


def check_false_or_all_false(d: dict[str, Any], field: str, component: str) -> None:
    value = d.get(field, False)
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(values):
        _fail(component, field, value, "false")


def per_block(value: Any, n: int, field: str, component: str) -> tuple[int, ...]:
    """An int for every block, or a list with one int per block."""
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    _fail(component, field, value, f"an int or a list of {n} ints")


def single_int(d: dict[str, Any], field: str, default: int, component: str) -> int:
    value = d.get(field, default)
    if not isinstance(value, int):
        _fail(component, field, value, "a single int")
    return value
