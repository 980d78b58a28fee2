"""Raw layers -> :class:`~fedpeft.config.schema.RunConfig`, and the TOML round trip.

Every entry point turns its raw input -- CLI flags, a TOML file, Flower's flat
``run_config`` -- into layers that :func:`build_config` merges (later wins), coerces to the
schema's types and checks for ranges and cross-field constraints (:mod:`fedpeft.config.checks`).
Nothing here needs the adapter registry or a file other than the one ``load_config_file``
reads: the checks that do (and that differ between the server and a node) live in
:mod:`fedpeft.load`, whose ``parse_config`` is what entry points call.

The resolved configuration travels to clients as a TOML string inside the round's
``ConfigRecord`` (Flower records cannot hold nested lists), so server and clients always
agree on it; its :func:`config_hash` is part of every round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.config.checks import check_config, require
from fedpeft.config.coerce import coerce, parse_proportions, parse_str_list
from fedpeft.config.schema import (
    STRATEGY_DEFAULTS,
    TASK_TYPE_DEFAULTS,
    AdapterConfig,
    CentralDPConfig,
    ConfigError,
    DataConfig,
    FaultConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
)
from fedpeft.config.tasks import parse_tasks

__all__ = ["build_config", "config_from_toml", "config_hash", "config_to_dict", "config_to_toml", "load_config_file"]

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "central": CentralDPConfig,
    "faults": FaultConfig,
    "strategy": StrategyConfig,
}
# Sections with free-form sub-tables (e.g. [tasks.NAME]) have a parser of their own.
_TABLE_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {"tasks": parse_tasks}


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}
    defaults = cls()
    for key, value in raw.items():
        full = f"{name}.{key}"
        norm = key.replace("-", "_")
        if norm not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(full, value, f"unknown key; allowed keys in [{name}]: {allowed}")
        default = getattr(defaults, norm)
        if norm == "target_modules":
            kwargs[norm] = parse_str_list(full, value)
        elif norm == "label_proportions":
            if value != "":  # empty = the default split (tiled over the clients)
                kwargs[norm] = parse_proportions(full, value)
        elif norm == "options":
            if isinstance(value, dict):
                kwargs[norm] = tuple(sorted(value.items()))
            elif isinstance(value, (list, tuple)):
                kwargs[norm] = tuple(tuple(v) for v in value)
            else:
                raise ConfigError(full, value, "expected a table of method options")
        else:
            kwargs[norm] = coerce(full, value, default)
    return cls(**kwargs)


def _nest(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn Flower-style flat keys ("privacy.epsilon") into nested tables."""
    nested: dict[str, Any] = {}
    for key, value in raw.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, value, f"'{part}' is both a value and a table")
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a nested dict (one-line error if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(path), "file not found; pass an existing TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", str(path), f"not valid TOML ({exc})") from None


def build_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge raw layers (later wins; flat dotted or nested keys), coerce them to the schema
    and run every check that needs no registry and no file (:func:`~fedpeft.config.checks.check_config`)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, _nest(layer))
    task_type = next((v for k, v in merged.items() if k.replace("-", "_") == "task_type"), RunConfig().task_type)
    if isinstance(task_type, str) and task_type in TASK_TYPE_DEFAULTS:  # the task type's defaults go underneath
        merged = _merge(_nest(TASK_TYPE_DEFAULTS[task_type]), merged)
    strategy = merged.get("strategy")
    name = strategy.get("name", StrategyConfig().name) if isinstance(strategy, dict) else StrategyConfig().name
    if isinstance(name, str) and name in STRATEGY_DEFAULTS:  # the strategy's defaults go underneath too
        merged = _merge({"strategy": dict(STRATEGY_DEFAULTS[name])}, merged)
    top_fields = {f.name: f for f in fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    base = RunConfig()
    for key, value in merged.items():
        norm = key.replace("-", "_")
        if norm in _SECTIONS or norm in _TABLE_PARSERS:
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"[{key}] must be a table")
            parser = _TABLE_PARSERS.get(norm)
            kwargs[norm] = parser(value) if parser else _build_section(norm, _SECTIONS[norm], value)
        elif norm in top_fields:
            kwargs[norm] = coerce(key, value, getattr(base, norm))
        else:
            allowed = ", ".join(sorted(list(top_fields)))
            raise ConfigError(key, value, f"unknown key; allowed: {allowed}")
    cfg = RunConfig(**kwargs)
    data_raw = merged.get("data", {}) if isinstance(merged.get("data"), dict) else {}
    props_given = any(k.replace("-", "_") == "label_proportions" and v != "" for k, v in data_raw.items())
    # Range first: the paper's mixes are tiled per client below (--clients 10**12 must be a
    # one-line error, not a 24 GB tuple; found by the config fuzzer).
    require(1 <= cfg.train.clients <= 100_000, "train.clients", cfg.train.clients, "must be an integer in [1, 100000]")
    if not props_given and cfg.data.partition == "label-proportions" and cfg.train.clients != len(cfg.data.label_proportions):
        # The paper's three mixes, repeated: 10/90, 90/10, 50/50, 10/90, ...
        paper = DataConfig().label_proportions
        tiled = tuple(paper[i % len(paper)] for i in range(cfg.train.clients))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_proportions=tiled))
    check_config(cfg)
    return cfg


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name == "options":
                out[f.name] = {k: v for k, v in value}
            else:
                out[f.name] = _to_plain(value)
        return out
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (TOML-serialisable) of a resolved config."""
    return _to_plain(cfg)


def config_to_toml(cfg: RunConfig) -> str:
    """The fully resolved configuration as TOML text (written to ``config.toml``)."""
    plain = config_to_dict(cfg)
    top = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in plain.items() if isinstance(v, dict)}
    return tomli_w.dumps({**top, **tables})


def config_from_toml(text: str) -> RunConfig:
    """Inverse of :func:`config_to_toml`, structural: :func:`build_config`'s checks only.
    A process that will run the configuration wants :func:`fedpeft.load.config_from_toml`."""
    return build_config(tomllib.loads(text))


def config_hash(cfg: RunConfig, exclude: tuple[str, ...] = ("name", "output_dir")) -> str:
    """Stable hash of everything that changes the result (not names or paths)."""
    plain = config_to_dict(cfg)
    for key in exclude:
        plain.pop(key, None)
    return hashlib.sha256(tomli_w.dumps(plain).encode()).hexdigest()[:16]
