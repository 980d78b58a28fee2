"""Parse and validate a configuration for the process that will run it, by role.

:func:`fedpeft.config.build_config` checks everything a configuration can be checked for on
its own. What is left needs the floors above the configuration or this machine's disk:

* the adapter registry -- ``adapter.method`` is registered, the method accepts the
  configuration (``plugin.validate_config``), and under client-level central DP its release
  is a noised weighted mean (``central_dp_compatible``, :mod:`fedpeft.privacy.central`);
* files -- which ones depend on the **role** of the process:

  ``"server"`` (the ServerApp, ``fedpeft simulate`` / ``compare``): everything, including
  ``data.path`` (its held-out test split and label list) and the ``[tasks]`` files;
  ``"node"`` (a deployed SuperNode, or a simulated ClientApp, receiving the server's resolved
  configuration): only what the node itself reads, ``model.path``. ``data.path`` and the task
  files name the *server's* files: a node reads its own file, named in its node config, and on
  separate hosts the server's path does not exist there.

Every refusal is a one-line :class:`~fedpeft.config.ConfigError`, the same text whichever role found it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.adapters import get as get_plugin
from fedpeft.adapters import names as method_names
from fedpeft.config import ConfigError, RunConfig, build_config
from fedpeft.config import config_from_toml as structural_from_toml
from fedpeft.config.schema import DATA_SUFFIXES
from fedpeft.strategies.registry import check_central_dp, strategy_class
from fedpeft.strategies.registry import names as strategy_names
from fedpeft.tasks import registry as task_registry

__all__ = ["ROLES", "config_from_toml", "parse_config", "validate"]

ROLES = ("server", "node")


def parse_config(*layers: dict[str, Any], role: str = "server") -> RunConfig:
    """Merge raw layers (later wins; flat dotted or nested keys) and validate them for ``role``."""
    cfg = build_config(*layers)
    validate(cfg, role)
    return cfg


def config_from_toml(text: str, role: str = "server") -> RunConfig:
    """Inverse of :func:`fedpeft.config.config_to_toml`, validated for ``role``."""
    cfg = structural_from_toml(text)
    validate(cfg, role)
    return cfg


def validate(cfg: RunConfig, role: str = "server") -> None:
    """The registry checks (both roles) and the file checks of ``role`` (module doc), in the
    order the single validation had them: model, data, method, method's own, central DP, tasks."""
    if role not in ROLES:
        raise ValueError(f"unknown validation role {role!r}; allowed: {', '.join(ROLES)}")
    m, d = cfg.model, cfg.data
    if m.path and not Path(m.path).is_dir():
        raise ConfigError("model.path", m.path, "must be a local Hugging Face model directory")
    if role == "server" and d.path:
        _check_data_file("data.path", d.path, "file not found; pass an existing CSV or JSONL file")
    task_names = task_registry.names()
    if cfg.task_type not in task_names:
        raise ConfigError("task_type", cfg.task_type, f"allowed: {', '.join(task_names)}")
    task_registry.get(cfg.task_type).validate_config(cfg)
    strategies = strategy_names()
    if cfg.strategy.name not in strategies:
        raise ConfigError("strategy.name", cfg.strategy.name, f"allowed: {', '.join(strategies)}")
    names = method_names()
    if cfg.adapter.method not in names:
        raise ConfigError("adapter.method", cfg.adapter.method, f"allowed: {', '.join(names)}")
    plugin = get_plugin(cfg.adapter.method)
    plugin.validate_config(cfg)
    check_central_dp(cfg, strategy_class(cfg.strategy.name), plugin)
    if role == "server" and cfg.tasks.enabled:
        for spec in cfg.tasks.resolved():
            if spec.path:
                _check_data_file(f"tasks.{spec.name}.path", spec.path,
                                 "file not found; pass an existing CSV, TSV or JSONL file")


def _check_data_file(key: str, path: str, missing: str) -> None:
    """A text file this process will read: it exists and has a format the loaders read."""
    if not Path(path).is_file():
        raise ConfigError(key, path, missing)
    if Path(path).suffix.lower() not in DATA_SUFFIXES:
        raise ConfigError(key, path, "allowed formats: .csv, .tsv, .jsonl")
