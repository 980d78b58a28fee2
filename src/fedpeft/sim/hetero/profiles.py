"""Device profiles: typed records of a heterogeneous client's hardware and link.

The shipped catalogue is ``profiles.toml`` next to this module (every figure cites its
source there). A user file of the same shape adds profiles or overrides shipped ones by
name (:func:`load_catalogue`). Values are validated once, on load; a bad value raises
:class:`~fedpeft.config.ConfigError` naming the profile key, so the CLI prints one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, load_config_file

__all__ = ["CATALOGUE_PATH", "DeviceProfile", "load_catalogue"]

CATALOGUE_PATH = Path(__file__).with_name("profiles.toml")
GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of client device. See ``profiles.toml`` for units and sources."""

    name: str
    tflops: float
    memory_gb: float
    uplink_mbps: float
    downlink_mbps: float
    availability: float = 1.0
    crash_rate: float = 0.0
    usable_fraction: float = 0.9
    source_compute: str = ""
    source_network: str = ""
    source_reliability: str = ""

    @property
    def usable_bytes(self) -> float:
        """Memory a training process may use on this device, in bytes."""
        return self.memory_gb * GB * self.usable_fraction

    def validate(self) -> None:
        """Raise ConfigError for a non-physical value."""
        key = f"profiles.{self.name}"
        for attr in ("tflops", "memory_gb", "uplink_mbps", "downlink_mbps"):
            value = getattr(self, attr)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key}.{attr}", value, "must be a positive finite number")
        for attr in ("availability", "usable_fraction"):
            value = getattr(self, attr)
            if not (0 < value <= 1):
                raise ConfigError(f"{key}.{attr}", value, "must be in (0, 1]")
        if not (0 <= self.crash_rate < 1):
            raise ConfigError(f"{key}.crash_rate", self.crash_rate, "must be in [0, 1)")


_FIELDS = {f.name for f in fields(DeviceProfile)} - {"name"}


def _profile(name: str, raw: Any, base: DeviceProfile | None, origin: str) -> DeviceProfile:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"profiles.{name}", raw, f"must be a table in {origin}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"profiles.{name}.{unknown[0]}", raw[unknown[0]],
                          f"unknown profile key; allowed: {', '.join(sorted(_FIELDS))}")
    values: dict[str, Any] = {f: getattr(base, f) for f in _FIELDS} if base else {}
    values.update(raw)
    missing = sorted({"tflops", "memory_gb", "uplink_mbps", "downlink_mbps"} - set(values))
    if missing:
        raise ConfigError(f"profiles.{name}.{missing[0]}", None, f"required for a new profile ({origin})")
    for key, value in values.items():
        if key.startswith("source_"):
            values[key] = str(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"profiles.{name}.{key}", value, "expected a number")
        else:
            values[key] = float(value)
    profile = DeviceProfile(name=name, **values)
    profile.validate()
    return profile


def _read(path: Path) -> dict[str, Any]:
    try:
        return load_config_file(path)
    except ConfigError as exc:
        raise ConfigError("profiles", str(path), exc.allowed) from None


def load_catalogue(*extra: str | Path, extra_tables: Mapping[str, Any] | None = None) -> dict[str, DeviceProfile]:
    """The shipped profiles, then each ``extra`` file and ``extra_tables`` on top (later wins;
    a table for an existing name may override single keys)."""
    catalogue: dict[str, DeviceProfile] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = [(str(CATALOGUE_PATH), _read(CATALOGUE_PATH))]
    layers += [(str(p), _read(Path(p))) for p in extra if str(p)]
    if extra_tables:
        layers.append(("scenario [profiles]", extra_tables))
    for origin, table in layers:
        for name, raw in table.items():
            catalogue[name] = _profile(name, raw, catalogue.get(name), origin)
    return catalogue
