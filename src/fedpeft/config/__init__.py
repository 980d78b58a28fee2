"""Typed run configuration: the ground floor, importing nothing else of fedpeft.

* :mod:`fedpeft.config.schema` -- :class:`ConfigError`, the allowed values and one frozen
  dataclass per section, :class:`RunConfig` holding them all;
* :mod:`fedpeft.config.parse` -- layers to a :class:`RunConfig` (:func:`build_config`), the TOML
  round trip and :func:`config_hash`; :mod:`fedpeft.config.checks` and
  :mod:`fedpeft.config.tasks` hold the range checks and the ``[tasks]`` parser it runs.

Invalid values raise :class:`ConfigError` whose message is a single line naming the key,
the value and what is allowed; the CLI turns it into exit status 2. The checks that need the
adapter registry or the file system, and that differ between the server and a node, are
:func:`fedpeft.load.parse_config`'s: entry points parse through :mod:`fedpeft.load`.
"""

from fedpeft.config.parse import (
    build_config,
    config_from_toml,
    config_hash,
    config_to_dict,
    config_to_toml,
    load_config_file,
)
from fedpeft.config.schema import (
    STRATEGY_DEFAULTS,
    STRATEGY_OPTIONS,
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
    TasksConfig,
    TaskSpec,
    TrainConfig,
)

__all__ = [
    "STRATEGY_DEFAULTS",
    "STRATEGY_OPTIONS",
    "TASK_TYPE_DEFAULTS",
    "AdapterConfig",
    "CentralDPConfig",
    "ConfigError",
    "DataConfig",
    "FaultConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "StrategyConfig",
    "TaskSpec",
    "TasksConfig",
    "TrainConfig",
    "build_config",
    "config_from_toml",
    "config_hash",
    "config_to_dict",
    "config_to_toml",
    "load_config_file",
]
