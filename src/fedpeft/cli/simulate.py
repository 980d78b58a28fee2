"""``fedpeft simulate``, ``fedpeft methods``, ``fedpeft strategies`` and ``fedpeft tasks``."""

from __future__ import annotations

import argparse

from fedpeft.cli.common import add_simulate_options, config_from_args, register_command, resume_config


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.sim.simulate import simulate
    from fedpeft.tasks.registry import task_for

    if getattr(args, "resume", None):
        cfg = resume_config(args)
        path, rows = simulate(cfg, resume=True)
    else:
        cfg = config_from_args(args)
        path, rows = simulate(cfg)
    last = rows[-1]
    eps = (f"epsilon={last['epsilon']:.3f} ({last['epsilon_unit']}, {last.get('epsilon_relation', '?')} neighbours, "
           f"delta={last['delta']:g}, {last['accountant']}; check: fedpeft privacy audit {path})"
           if cfg.privacy.enabled else "no DP")
    metric = task_for(cfg).primary_metric
    print(f"fedpeft: {len(rows)} rounds done: {metric}={last[metric]:.4f} {eps}; run directory: {path}")
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


SIMULATE_HELP = "run a federation on this machine (Flower simulation engine)"
register_command("simulate", SIMULATE_HELP, add_simulate_options, cmd_simulate)
register_command("methods", "list the adapter methods", lambda p: None, _cmd_methods)
register_command("strategies", "list the server strategies ([strategy] name) and their options", lambda p: None,
                 _cmd_strategies)
register_command("tasks", "list the task types (--task) and the defaults each one changes", lambda p: None, _cmd_tasks)
