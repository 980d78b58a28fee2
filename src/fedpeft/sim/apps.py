"""The apps ``fedpeft simulate`` hands to Flower's runtime (``flwr run`` on a local SuperLink).

A run through the supported runtime (:mod:`fedpeft.sim.superlink`) crosses a process
boundary: the ServerApp and the ClientApps run in Flower's ``flwr-simulation`` process and its
Ray workers, loaded by name from a generated app directory (:func:`write_app_dir`). What
``simulate`` decided in this process travels in one *launch file* (:func:`write_launch`),
named by the app's single run-config key ``launch``:

* the parsed configuration (exactly the object this process validated, so its hash is the
  one ``--resume`` checked), the run directory, whether to resume;
* a heterogeneous-device scenario, rebuilt server-side into its
  :class:`~fedpeft.sim.hetero.hook.HeteroEmulator` (round hook and deadline timer).

:data:`server_app` reads it and runs :func:`fedpeft.server.loop.run_federation`; the
ClientApp is :data:`client_app` (the real client plus the simulation-only mods). Both live in
this one module, which imports everything either needs at import time: Flower loads the
ServerApp in a thread while its main thread loads the ClientApp, and two threads importing the
same packages at once (Opacus) fail with a circular-import error; one module's import lock
serialises them.
The launch file is written by this package for its own child processes, in the run's private
runtime directory, and read once by the ServerApp.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig
from fedpeft.server.app import configure_logging
from fedpeft.server.loop import run_federation
from fedpeft.sim.hetero.hook import HeteroEmulator
from fedpeft.sim.mods import simulation_app

__all__ = ["CLIENT_APP", "SERVER_APP", "Launch", "client_app", "finished_marker", "read_launch", "server_app",
           "write_app_dir", "write_finished", "write_launch"]

SERVER_APP = "fedpeft.sim.apps:server_app"
CLIENT_APP = "fedpeft.sim.apps:client_app"


@dataclass(frozen=True)
class Launch:
    """What the ServerApp of one simulated run needs from the process that started it."""

    cfg: RunConfig
    run_dir: str
    resume: bool = False
    scenario: Any = None  # a fedpeft.sim.hetero.scenario.Scenario, or None


def write_launch(path: Path, launch: Launch) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(launch))
    return path


def read_launch(path: str | Path) -> Launch:
    launch = pickle.loads(Path(path).read_bytes())  # noqa: S301 - written by write_launch for this run
    if not isinstance(launch, Launch):
        raise ValueError(f"{path}: not a fedpeft launch file")
    return launch


def write_app_dir(app_dir: Path) -> Path:
    """A minimal Flower app (``pyproject.toml`` only): fedpeft's simulation ServerApp and
    ClientApp by name, one run-config key ``launch``, no dependencies to install."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpeft-simulation"
version = "1.0.0"
description = "fedpeft simulate, through a local SuperLink"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedpeft"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
launch = ""
""", encoding="utf-8")
    return app_dir


client_app = simulation_app()
"""The real client plus the simulation-only mods (:mod:`fedpeft.sim.mods`)."""

server_app = ServerApp()
"""Runs the launch file's federation (module doc)."""


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    configure_logging()
    launch = read_launch(str(context.run_config["launch"]))
    hooks: list[Any] = []
    timer = None
    if launch.scenario is not None:
        timer = HeteroEmulator(launch.scenario, launch.cfg)
        hooks.append(timer)
    run_federation(grid, launch.cfg, Path(launch.run_dir), hooks=hooks, resume=launch.resume, round_timer=timer)
    write_finished(str(context.run_config["launch"]))


def finished_marker(launch_path: str | Path) -> Path:
    """The file the ServerApp writes next to the launch file once its federation has returned:
    every round, checkpoint, adapter and report is on disk. The process that started the run
    then stops the runtime at once (:meth:`~fedpeft.sim.superlink.LocalSuperLink.run`) instead
    of waiting ~4 s for Flower's own teardown (Ray's actors and daemons, the task output push,
    the log stream's last poll), which nothing of the run needs."""
    return Path(launch_path).with_name("finished")


def write_finished(launch_path: str | Path) -> None:
    marker = finished_marker(launch_path)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text("finished\n", encoding="utf-8")
    tmp.replace(marker)  # atomic: the starter never reads a half-written marker
