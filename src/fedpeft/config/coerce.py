"""Turning raw values (TOML values, CLI strings, Flower's flat ``run_config``) into the types of
the schema, with a one-line :class:`~fedpeft.config.schema.ConfigError` for anything else.

Its own module so that both the section parser (:mod:`fedpeft.config.parse`) and the
``[tasks]`` parser (:mod:`fedpeft.config.tasks`), which the section parser calls, share it
without importing each other.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.config.schema import ConfigError

__all__ = ["coerce", "parse_proportions", "parse_str_list"]


def coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` or raise ConfigError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(key, value, "expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(key, value, "expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, value, "expected an integer") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(key, value, "expected an integer")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(key, value, "expected a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, value, "expected a number (or inf)") from None
        if math.isnan(out):
            raise ConfigError(key, value, "expected a number, not NaN")
        return out
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, value, "expected a string")
        return str(value)
    return value


def parse_str_list(key: str, value: Any) -> tuple[str, ...]:
    """A list of names, or the comma-separated string a CLI flag gives."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise ConfigError(key, value, "expected a list of names or a comma-separated string")
    if not items:
        raise ConfigError(key, value, "expected at least one name")
    return tuple(items)


def parse_proportions(key: str, value: Any) -> tuple[tuple[float, ...], ...]:
    """Accept [[0.1,0.9],[0.9,0.1]] or the string "0.1,0.9;0.9,0.1"."""
    rows: list[list[Any]]
    if isinstance(value, str):
        rows = [r.split(",") for r in value.split(";") if r.strip()]
    elif isinstance(value, (list, tuple)):
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in value]
    else:
        raise ConfigError(key, value, "expected rows of class fractions, e.g. 0.1,0.9;0.9,0.1")
    try:
        out = tuple(tuple(float(x) for x in row) for row in rows)
    except (TypeError, ValueError):
        raise ConfigError(key, value, "expected numbers, e.g. 0.1,0.9;0.9,0.1") from None
    if not out or any(len(r) != len(out[0]) for r in out):
        raise ConfigError(key, value, "expected rows of equal length (one fraction per class)")
    for row in out:
        if any(x < 0 or not math.isfinite(x) for x in row) or not math.isclose(sum(row), 1.0, abs_tol=1e-6):
            raise ConfigError(key, value, "each row must be non-negative fractions summing to 1")
    return out
