"""Typed method options: one frozen dataclass per method, filled and checked in one place.

A method that takes options (``--set adapter.options.KEY=VALUE``, or ``[adapter.options]`` in
TOML) declares them as a frozen, keyword-only dataclass whose fields are made with
:func:`option` and names it as its plugin's ``options_type``::

    @dataclass(frozen=True, kw_only=True)
    class SaraOptions:
        fraction: float = option(0.02, low=1e-6, high=1.0)

:func:`parse_options` turns ``cfg.adapter.options`` into that dataclass: an unknown key, a
value of the wrong type or out of range is a one-line :class:`~fedpeft.config.ConfigError`
naming ``adapter.options.KEY``, the value and what is allowed. CLI values arrive as strings
and TOML values typed, so numbers are read with ``float()`` (``"3"``, ``3`` and ``3.0`` are
the same integer). Supported field types: ``int``, ``float`` (both need ``low`` and
``high``), ``bool`` (true/false/1/0) and ``str`` (optionally one of ``choices``). A default or
bound may depend on the run (a callable of the :class:`~fedpeft.config.RunConfig`, e.g. "at
most ``adapter.rank``"), and ``check`` may validate or normalise a value against the rest
of the configuration.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fedpeft.config import ConfigError, RunConfig

__all__ = ["OptionSpec", "option", "option_specs", "parse_options"]

OptionsT = TypeVar("OptionsT")
Value = int | float | bool | str
Bound = float | Callable[[RunConfig], float] | None
_META = "fedpeft-option"
_SPECS: dict[type, dict[str, tuple[type, OptionSpec]]] = {}  # option_specs per options class


@dataclass(frozen=True)
class OptionSpec:
    """How one option is read: default, bounds (numbers), choices (strings), extra check."""

    default: Value | Callable[[RunConfig], Value]
    low: Bound = None
    high: Bound = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any, RunConfig], Any] | None = None  # (value, cfg) -> value, may raise ConfigError

    def default_for(self, cfg: RunConfig) -> Value:
        return self.default(cfg) if callable(self.default) else self.default

    def bounds(self, cfg: RunConfig) -> tuple[float, float]:
        low, high = (b(cfg) if callable(b) else b for b in (self.low, self.high))
        assert low is not None and high is not None, "numeric options need low and high"
        return low, high


def option(
    default: Value | Callable[[RunConfig], Value], *, low: Bound = None, high: Bound = None,
    choices: tuple[str, ...] = (), check: Callable[[Any, RunConfig], Any] | None = None,
) -> Any:
    """A dataclass field for one method option (see the module docstring). A constant default
    is also the field's dataclass default; a run-dependent one leaves the field required."""
    spec = OptionSpec(default, low, high, choices, check)
    if callable(default):
        return dataclasses.field(metadata={_META: spec})
    return dataclasses.field(default=default, metadata={_META: spec})


def option_specs(cls: type) -> dict[str, tuple[type, OptionSpec]]:
    """Field name -> (type, spec) of an options dataclass, in declaration order."""
    if cls in _SPECS:
        return _SPECS[cls]
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, OptionSpec]] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META)
        kind = hints[f.name]
        if not isinstance(spec, OptionSpec) or kind not in (int, float, bool, str):
            raise TypeError(f"{cls.__name__}.{f.name}: method options are int/float/bool/str fields made with option()")
        out[f.name] = (kind, spec)
    _SPECS[cls] = out
    return out


def parse_options(method: str, cls: type[OptionsT], cfg: RunConfig) -> OptionsT:
    """``cfg.adapter.options`` as ``cls``: every key known, every value typed and in range."""
    given = dict(cfg.adapter.options)
    specs = option_specs(cls)
    unknown = sorted(k for k in given if k not in specs)
    if unknown:
        raise ConfigError(f"adapter.options.{unknown[0]}", given[unknown[0]],
                          f"unknown option for {method}; allowed: {', '.join(specs) or 'none'}")
    values: dict[str, Any] = {}
    for name, (kind, spec) in specs.items():
        raw = given.get(name, spec.default_for(cfg))
        value = _read(f"adapter.options.{name}", kind, raw, spec, cfg)
        values[name] = spec.check(value, cfg) if spec.check is not None else value
    return cls(**values)


def _read(key: str, kind: type, raw: Any, spec: OptionSpec, cfg: RunConfig) -> Value:
    """One raw value as ``kind`` (ConfigError naming ``key`` otherwise)."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "false", "0"):
            return str(raw).lower() in ("true", "1")
        raise ConfigError(key, raw, "expected true or false")
    if kind is str:
        text = str(raw)
        if spec.choices and text not in spec.choices:
            raise ConfigError(key, text, f"allowed: {', '.join(spec.choices)}")
        return text
    low, high = spec.bounds(cfg)
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(key, raw, "expected an integer" if kind is int else "expected a number") from None
    if kind is int:
        if not math.isfinite(number) or number != int(number) or not (low <= number <= high):
            raise ConfigError(key, raw, f"must be an integer in [{int(low)}, {int(high)}]")
        return int(number)
    if not (low <= number <= high):
        raise ConfigError(key, raw, f"must be in [{low:g}, {high:g}]")
    return number
