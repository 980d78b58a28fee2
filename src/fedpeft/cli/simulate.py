"""``fedpeft simulate``, ``fedpeft methods``, ``fedpeft strategies`` and ``fedpeft tasks``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft.cli.common import add_simulate_options, config_from_args, register_command, resume_config
from fedpeft.config import RunConfig


def run_with_console(args: argparse.Namespace, run: Callable[..., tuple[Path, list[dict[str, Any]]]],
                     cfg: RunConfig) -> tuple[Path, list[dict[str, Any]]]:
    """``run(cfg, **options)`` with ``fedpeft simulate``'s output (:mod:`fedpeft.cli.console`):
    header, a progress bar and a line per round, the final table (none of it with ``-q``)."""
    from fedpeft.cli.console import Console
    from fedpeft.tasks.registry import task_for

    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    console = Console(tuple(task_for(cfg).metric_names), quiet=quiet)
    try:
        path, rows = run(cfg, progress=console, verbose=verbose, runtime=getattr(args, "runtime", None))
    finally:
        console.close()
    console.table(rows)
    return path, rows


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.cli.console import result_line
    from fedpeft.sim.simulate import simulate
    from fedpeft.tasks.registry import task_for

    resume = bool(getattr(args, "resume", None))
    cfg = resume_config(args) if resume else config_from_args(args)
    path, rows = run_with_console(args, lambda c, **kw: simulate(c, resume=resume, **kw), cfg)
    print(result_line(cfg, path, rows, task_for(cfg).primary_metric))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from fedpeft.adapters import plugins

    for plugin in plugins():
        print(plugin.describe())
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedpeft.strategies.registry import describe, names

    for name in names():
        print(describe(name))
    print("D = aggregate - the state the round sent out; a server optimiser is post-processing of the clients' "
          "DP outputs (no privacy cost). Set options with --set strategy.KEY=VALUE or [strategy] in --config.")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from fedpeft.config import TASK_TYPE_DEFAULTS
    from fedpeft.tasks.registry import get as get_task
    from fedpeft.tasks.registry import names

    def show(value: object) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    for name in names():
        print(get_task(name).describe())
        changed = [f"{section}.{k}={show(v)}" for section, values in TASK_TYPE_DEFAULTS.get(name, {}).items()
                   for k, v in values.items()]
        print("    defaults it changes: " + ("; ".join(changed) or "none (the schema's)"))
    return 0


SIMULATE_HELP = "run a federation on this machine (Flower simulation engine, through a local SuperLink)"
register_command("simulate", SIMULATE_HELP, add_simulate_options, cmd_simulate)
register_command("methods", "list the adapter methods", lambda p: None, _cmd_methods)
register_command("strategies", "list the server strategies ([strategy] name) and their options", lambda p: None,
                 _cmd_strategies)
register_command("tasks", "list the task types (--task) and the defaults each one changes", lambda p: None, _cmd_tasks)
