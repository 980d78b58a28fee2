"""Run a federation on one machine through Flower's simulation engine.

:func:`preflight` loads and checks everything that can fail on bad input (data file,
columns, classes, partitions, model directory) *before* Ray starts, so a mistake ends
with a one-line message and exit status 2 instead of a traceback from a worker.
:func:`simulate` then runs the real ``ServerApp`` + ``ClientApp`` (one Ray actor per
concurrent client; each actor caches the base model and reuses it for every round and
client it serves) on one of two runtimes:

* ``superlink`` (the default): Flower 1.42's supported path, ``flwr run`` against a private
  local SuperLink in simulation mode (:mod:`fedpeft.sim.superlink`); the apps are loaded by
  name in Flower's ``flwr-simulation`` process (:mod:`fedpeft.sim.apps`), so only what
  pickles crosses: the configuration, the run directory, resume, a hetero scenario.
* ``inprocess``: the ServerApp runs in this process (``flwr.simulation.run_simulation``,
  deprecated in Flower 1.42, its warning silenced). Only for callers that hand the server
  loop live Python objects (``hooks``, ``wrap_strategy``, ``round_timer``: tests and
  benchmarks that observe the loop); chosen automatically when they are given.

The ClientApp is the deployed one plus the simulation-only mods of :mod:`fedpeft.sim.mods`
(fault injection, device emulation); a deployed node runs it without them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from flwr.serverapp.strategy import Strategy

from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.partition import partition_sizes
from fedpeft.server.loop import RoundHook
from fedpeft.server.run_dir import RunDir, default_run_dir
from fedpeft.strategies.deadlines import RoundTimer
from fedpeft.tasks.model import pick_device
from fedpeft.tasks.registry import task_for

__all__ = ["RUNTIMES", "Progress", "backend_config", "concurrent_clients", "preflight", "simulate"]

log = logging.getLogger("fedpeft")

RUNTIMES = ("superlink", "inprocess")


class Progress(Protocol):
    """What a console shows of a run (``fedpeft simulate``'s, in :mod:`fedpeft.cli.console`)."""

    def started(self, cfg: RunConfig, run_dir: Path, runtime: str) -> None: ...

    def update(self, server_round: int, attempt: int, replies: int, sent: int) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None: ...


def preflight(cfg: RunConfig) -> list[int]:
    """Validate data, partitions and model; return examples per client."""
    task_type = task_for(cfg)
    task_type.resolve_model(cfg.model)  # a GGUF model is converted here, once, before any worker starts
    pick_device(cfg.device)
    if cfg.tasks.enabled:  # multi-task federation: every task's data (src/fedpeft/data/layout.py)
        from fedpeft.data.layout import preflight_tasks

        task_type.load_tokenizer(cfg.model)
        return preflight_tasks(cfg, task_type.task_layout(cfg))
    data = task_type.task_layout(cfg)[0]  # the split every process uses (validation held out)
    pool, test = data.pool, data.test
    sizes = partition_sizes(pool, cfg.data, cfg.train.clients, cfg.seed)
    empty = [i for i, n in enumerate(sizes) if n < 2]
    if empty:
        raise ConfigError("train.clients", cfg.train.clients,
                          f"clients {empty[:5]} get fewer than 2 examples; use fewer clients or more data")
    task_type.load_tokenizer(cfg.model)
    log.info("data: %d training examples in %d classes %s, test %d; per client: %s",
             len(pool), pool.num_classes, list(pool.label_names), len(test), sizes[:10])
    return sizes


def concurrent_clients(cfg: RunConfig, cores: int) -> int:
    """How many client actors run at once on ``cores`` CPUs.

    A round's clients all run concurrently when there are at most twice as many as cores
    (3 clients on 2 cores: three single-threaded actors share the cores, instead of two
    actors followed by one that leaves a core idle for a whole client's training -- about
    a quarter of the round's time); otherwise one actor per core, in waves.
    """
    per_round = cfg.train.clients_per_round or cfg.train.clients
    return per_round if per_round <= 2 * cores else cores


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: a CPU share per client actor (see :func:`concurrent_clients`; Ray
    gives each actor one torch thread); a GPU fraction per client when CUDA is present so
    several clients share one device."""
    import math

    import torch

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    actors = concurrent_clients(cfg, cores)
    # Flower sizes its actor pool as int(cores / num_cpus): round the share down so that
    # float error can never cost an actor (2 / 0.666 = 3.003 -> 3 actors).
    share = math.floor(cores / actors * 1000) / 1000
    resources: dict[str, Any] = {"num_cpus": share, "num_gpus": 0.0}
    if gpus:
        resources["num_gpus"] = round(min(1.0, gpus / max(1, min(cfg.train.clients, 4))), 3)
    return {
        "client_resources": resources,
        "init_args": {"num_cpus": cores, "num_gpus": gpus, "include_dashboard": False},
    }


def simulate(
    cfg: RunConfig,
    run_dir: Path | None = None,
    hooks: Sequence[RoundHook] = (),
    wrap_strategy: Callable[[Strategy], Strategy] | None = None,
    backend: dict[str, Any] | None = None,
    resume: bool = False,
    round_timer: RoundTimer | None = None,
    scenario: Any = None,
    runtime: str | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run the federation; return the run directory and its metrics rows.

    ``hooks`` / ``wrap_strategy`` / ``round_timer`` are passed to the server loop
    (:func:`fedpeft.server.loop.run_federation`) and need ``runtime="inprocess"`` (the default
    when any is given); ``scenario`` (a :class:`~fedpeft.sim.hetero.scenario.Scenario`) emulates
    heterogeneous devices on either runtime; ``backend`` overrides :func:`backend_config` (e.g.
    GPU fractions per client); ``resume`` continues the run in ``run_dir`` from its checkpoint
    (see :mod:`fedpeft.server.checkpoint`); ``progress`` is told of each round as it runs;
    ``verbose`` copies the runtime's own log to stderr. ``runtime`` (default: the
    ``FEDPEFT_RUNTIME`` environment variable, else ``superlink``) is one of :data:`RUNTIMES`.
    """
    from fedpeft.sim.watch import RunWatcher

    live = bool(hooks) or wrap_strategy is not None or round_timer is not None
    chosen = runtime or os.environ.get("FEDPEFT_RUNTIME") or ("inprocess" if live else "superlink")
    if chosen not in RUNTIMES:
        raise ConfigError("runtime", chosen, f"allowed: {', '.join(RUNTIMES)}")
    if chosen == "superlink" and live:
        raise ConfigError("runtime", chosen, "hooks, wrap_strategy and round_timer are Python objects of this "
                                             "process; they need runtime='inprocess'")
    path = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if not resume and (path / "metrics.jsonl").exists():
        raise ConfigError("output_dir", str(path), "already holds a run; choose another --output-dir")
    link = None
    if chosen == "superlink":  # it gets ready while this process checks the data and the model
        from fedpeft.sim.superlink import LocalSuperLink

        link = LocalSuperLink(verbose=verbose)
    try:
        if link is not None:
            link.launch()
        cfg = _prepare(cfg, path)
        backend = backend if backend is not None else backend_config(cfg)
        watcher = RunWatcher(path, progress)
        if progress is not None:
            progress.started(cfg, path, chosen)
        if link is not None:
            link.keep_log = path / "flower.log"
            _run_superlink(link, cfg, path, resume, scenario, backend, watcher, verbose)
        else:
            if scenario is not None:
                from fedpeft.sim.hetero.hook import HeteroEmulator

                emulator = HeteroEmulator(scenario, cfg)
                hooks, round_timer = [*hooks, emulator], emulator
            with watcher.background():
                _run_inprocess(cfg, path, hooks, wrap_strategy, backend, resume, round_timer)
    finally:
        if link is not None:
            link.stop()
    rows = RunDir(path).read_metrics()
    if len(rows) != cfg.train.rounds:
        from fedpeft.sim.superlink import RuntimeFailed  # a RuntimeError: one line on the command line

        raise RuntimeFailed(f"simulation ended after {len(rows)} of {cfg.train.rounds} rounds; see {path}/server.log")
    return path, rows


def _prepare(cfg: RunConfig, path: Path) -> RunConfig:
    """Check data, model and run directory (one-line errors before any round); the resolved configuration."""
    preflight(cfg)
    cfg = task_for(cfg).resolve_config(cfg)  # as the server loop will, so a resume's hash matches config.toml
    RunDir(path).check_reuse(cfg)  # ledgers of another configuration: refused here, before Ray starts
    (path / "progress.json").unlink(missing_ok=True)  # a crashed run's round in flight is not this run's
    return cfg


def _run_superlink(link: Any, cfg: RunConfig, path: Path, resume: bool, scenario: Any, backend: dict[str, Any],
                   watcher: Any, verbose: bool) -> None:
    """The run through ``flwr run`` on the launched private SuperLink ``link`` (module doc); the
    caller stops it (and everything it started) whatever happens, Ctrl-C and SIGTERM included."""
    from fedpeft.sim.apps import Launch, finished_marker, write_app_dir, write_launch
    from fedpeft.sim.superlink import RuntimeFailed, federation_config, terminate_as_interrupt

    watcher.tail(link.live_log if verbose else None)
    with terminate_as_interrupt():
        link.wait_ready()
        home = link.home_path
        launch = write_launch(home / "launch.pickle", Launch(cfg, str(path.resolve()), resume, scenario))
        app_dir = write_app_dir(home / "app")
        try:
            link.run(app_dir, f'launch="{launch}"', federation_config(cfg.train.clients, backend), poll=watcher.poll,
                     finished=finished_marker(launch))
        except RuntimeFailed as exc:
            raise RuntimeFailed(f"{exc}{_last_error(link.live_log)}") from None
    log_path = link.log_path
    rows = RunDir(path).read_metrics()
    if len(rows) != cfg.train.rounds:
        raise RuntimeFailed(f"simulation ended after {len(rows)} of {cfg.train.rounds} rounds"
                            f"{_last_error(link.live_log)}; see {log_path}")


def _last_error(log_path: Path) -> str:
    """``: <the last exception line>`` of the runtime's log, or ``""``."""
    import re

    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    found = re.findall(r"^(?:\S+\.)?[A-Z]\w*(?:Error|Exception|Crash): .+$", text, flags=re.MULTILINE)
    return f": {found[-1].strip()[:300]}" if found else ""


def _run_inprocess(cfg: RunConfig, path: Path, hooks: Sequence[RoundHook],
                   wrap_strategy: Callable[[Strategy], Strategy] | None, backend: dict[str, Any], resume: bool,
                   round_timer: RoundTimer | None) -> None:
    """The ServerApp in this process, through Flower 1.42's deprecated ``run_simulation``."""
    from flwr.simulation import run_simulation

    from fedpeft.server.app import make_server_app
    from fedpeft.sim.mods import simulation_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=make_server_app(cfg, str(path), hooks=hooks, wrap_strategy=wrap_strategy, resume=resume,
                                       round_timer=round_timer),
            client_app=simulation_app(),  # the real client + the simulation-only mods (fedpeft.sim.mods)
            num_supernodes=cfg.train.clients,
            backend_config=backend,
        )
