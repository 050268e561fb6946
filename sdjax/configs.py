"""Checks shared by the model configs: read a diffusers/transformers config.json, refuse what sdjax can't build.

Every error names the component and the field, says what the file has and what sdjax supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


class UnsupportedConfigError(ValueError):
    """A config.json asks for an architecture sdjax does not implement."""


class ConfigFieldError(ValueError):
    """A config.json field has the wrong type or a value out of range; the message says what is allowed."""


def bad_field(component: str, field: str, value: Any, allowed: str) -> ConfigFieldError:
    return ConfigFieldError(f"{component} config field '{field}' must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not counts


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_object(d: Any, component: str) -> dict[str, Any]:
    """A config is a JSON object of fields (not a list, a string, ...)."""
    if not isinstance(d, dict):
        kind = {list: "list", str: "string", type(None): "null", bool: "boolean"}.get(type(d), "number")
        raise ConfigFieldError(f"{component} config must be a JSON object of fields, got a JSON {kind}")
    return d


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
    """An int for every block, or a list with one int per block; each >= 1."""
    if _is_int(value):
        values: tuple = (value,) * n
    elif isinstance(value, (list, tuple)) and len(value) == n and all(_is_int(v) for v in value):
        values = tuple(value)
    else:
        _fail(component, field, value, f"an int or a list of {n} ints")
    if min(values) < 1:
        raise bad_field(component, field, value, f"an integer >= 1 or a list of {n} integers >= 1")
    return values


def single_int(d: dict[str, Any], field: str, default: int, component: str, minimum: int = 1) -> int:
    """An int field >= minimum (a per-block list, which diffusers allows for some fields, is not supported)."""
    value = d.get(field, default)
    if isinstance(value, (list, tuple)):
        _fail(component, field, value, "a single int")
    if not _is_int(value) or value < minimum:
        raise bad_field(component, field, value, f"an integer >= {minimum}")
    return value


def number(d: dict[str, Any], field: str, default: float, component: str, *, positive: bool = False) -> float:
    """A finite number field (> 0 when `positive`)."""
    value = d.get(field, default)
    if not _is_number(value) or (positive and value <= 0):
        raise bad_field(component, field, value, "a finite number > 0" if positive else "a finite number")
    return value


def optional_number(d: dict[str, Any], field: str, component: str) -> float | None:
    value = d.get(field)
    if value is not None and not _is_number(value):
        raise bad_field(component, field, value, "a finite number or null")
    return value


def boolean(d: dict[str, Any], field: str, default: bool, component: str) -> bool:
    value = d.get(field, default)
    if not isinstance(value, bool):
        raise bad_field(component, field, value, "true or false")
    return value


def channels(d: dict[str, Any], field: str, component: str) -> tuple[int, ...]:
    """A required, non-empty list of channel counts >= 1 (e.g. `block_out_channels`)."""
    if field not in d:
        raise ConfigFieldError(f"{component} config has no '{field}' (needed: a non-empty list of integers >= 1)")
    value = d[field]
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v >= 1 for v in value):
        raise bad_field(component, field, value, "a non-empty list of integers >= 1")
    return tuple(value)


def block_types(d: dict[str, Any], field: str, allowed: Sequence[str], n: int, component: str,
                default: Sequence[str] | None = None) -> tuple[str, ...]:
    """A list of n block type names, each one sdjax implements (required unless there is a default)."""
    value = d.get(field, default)
    if value is None:
        raise ConfigFieldError(f"{component} config has no '{field}' (needed: a list of {n} of {', '.join(allowed)})")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad_field(component, field, value, f"a list of {n} block type names ({', '.join(allowed)})")
    check_choices({field: value}, field, allowed, component)
    if len(value) != n:
        raise ConfigFieldError(
            f"{component} config field '{field}' has {len(value)} entries but block_out_channels has {n}")
    return tuple(value)


def check_groups(groups: int, chans: Sequence[int], component: str) -> None:
    """Group norms split every block's channels into `norm_num_groups` equal groups."""
    for i, ch in enumerate(chans):
        if ch % groups:
            raise ConfigFieldError(
                f"{component} config field 'norm_num_groups' = {groups} must divide every entry of "
                f"block_out_channels {list(chans)}, but not block_out_channels[{i}] = {ch}")
