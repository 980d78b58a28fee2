"""The fedpeft ServerApp.

``flwr run .`` loads :data:`app`; its configuration is Flower's ``run_config`` (the
``[tool.flwr.app.config]`` table of ``pyproject.toml`` plus ``--run-config`` overrides),
optionally layered on a TOML file named by the ``config`` key. ``fedpeft simulate`` builds
the same ServerApp with :func:`make_server_app` around an already-parsed configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.config import RunConfig, load_config_file
from fedpeft.load import parse_config
from fedpeft.server.loop import RoundHook, run_federation
from fedpeft.server.run_dir import default_run_dir
from fedpeft.strategies.deadlines import RoundTimer

__all__ = ["app", "config_from_run_config", "configure_logging", "make_server_app"]


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Parse Flower's flat run_config; a non-empty ``config`` key names a TOML base file.

    An empty string is "not set" (every key must be listed in ``pyproject.toml`` for
    ``--run-config`` to accept it, so the task-type-dependent ones are listed as ``""``): the
    TOML file's value, the task type's default or the schema's default applies instead."""
    raw = {k: v for k, v in run_config.items() if v != ""}
    file_layer: dict[str, Any] = {}
    path = str(raw.pop("config", "") or "")
    if path:
        file_layer = load_config_file(path)
    return parse_config(file_layer, raw)


def configure_logging() -> None:
    """fedpeft's log lines on the ServerApp process's stderr (Flower's runtime collects them)."""
    logger = logging.getLogger("fedpeft")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedpeft: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def make_server_app(
    cfg: RunConfig,
    run_dir: str | None = None,
    timeout: float = 3600.0,
    hooks: Sequence[RoundHook] = (),
    wrap_strategy: Callable[[Strategy], Strategy] | None = None,
    resume: bool = False,
    round_timer: RoundTimer | None = None,
) -> ServerApp:
    """A ServerApp bound to a parsed configuration (used by ``fedpeft simulate``); the
    arguments are :func:`~fedpeft.server.loop.run_federation`'s."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        configure_logging()
        run_federation(grid, cfg, default_run_dir(cfg) if run_dir is None else Path(run_dir), timeout=timeout,
                       hooks=hooks, wrap_strategy=wrap_strategy, resume=resume, round_timer=round_timer)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = config_from_run_config(dict(context.run_config))
    run_federation(grid, cfg, default_run_dir(cfg))  # central DP, if configured, is part of the strategy chain
