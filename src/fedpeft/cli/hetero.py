"""``fedpeft simulate --scenario NAME|PATH`` and ``fedpeft profiles``.

Adds ``--scenario`` / ``--profiles`` to the existing ``simulate`` command by wrapping its
registration (the wrapped command runs unchanged without ``--scenario``). With a scenario,
the scenario's ``[config]`` table is the lowest configuration layer (``--config`` and flags
override it) and the run goes through the real Flower simulation with the
:class:`~fedpeft.sim.hetero.hook.HeteroEmulator` as hook and as the deadline wrapper's round
timer. ``--resume RUN_DIR --scenario NAME|PATH`` continues a scenario run (the same scenario:
its fingerprint in the checkpoint is checked).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedpeft.cli.common import add_simulate_options as _ADD
from fedpeft.cli.common import config_from_args, register_command, resume_config
from fedpeft.cli.simulate import SIMULATE_HELP as _HELP
from fedpeft.cli.simulate import cmd_simulate as _RUN
from fedpeft.cli.simulate import run_with_console
from fedpeft.config import ConfigError


def _add_args(p: argparse.ArgumentParser) -> None:
    _ADD(p)
    g = p.add_argument_group("heterogeneous clients (docs/hetero.md)")
    g.add_argument("--scenario", metavar="NAME|PATH",
                   help="emulate heterogeneous devices: a shipped scenario (see `fedpeft profiles`) or a TOML file")
    g.add_argument("--profiles", metavar="FILE", default="", help="extra device profiles (TOML) on top of the catalogue")


def _resumed_scenario(args: argparse.Namespace) -> dict[str, Any] | None:
    """The emulator state in ``--resume RUN_DIR``'s checkpoint (None: not a scenario run);
    a one-line ConfigError when ``--scenario`` is missing or given for a run without one."""
    from fedpeft.server.checkpoint import load_checkpoint
    from fedpeft.sim.hetero.hook import HeteroEmulator

    path = Path(args.resume) / "checkpoint.npz"
    if not path.is_file():
        return None  # resume_config says what is wrong with the directory
    try:
        state = load_checkpoint(path).hooks.get(HeteroEmulator.__name__)
    except ValueError as exc:
        raise ConfigError("--resume", args.resume, str(exc)) from None
    if state is not None and not args.scenario:
        raise ConfigError("--resume", args.resume, f"the run emulated scenario {state['scenario']}; resume it "
                                                   "with --scenario and that scenario")
    if state is None and args.scenario:
        raise ConfigError("--scenario", args.scenario, "the run being resumed had no scenario; resume it without "
                                                       "--scenario")
    return state


def _run(args: argparse.Namespace) -> int:
    resumed = _resumed_scenario(args) if getattr(args, "resume", None) else None
    if not getattr(args, "scenario", None):
        return _RUN(args)
    from fedpeft.sim.hetero.hook import HeteroEmulator
    from fedpeft.sim.hetero.run import run_scenario
    from fedpeft.sim.hetero.scenario import load_scenario
    from fedpeft.tasks.registry import task_for

    scenario = load_scenario(args.scenario, args.profiles or "")
    if resumed is not None:
        cfg = resume_config(args)  # the run's own config.toml (the scenario's [config] is in it)
        if HeteroEmulator(scenario, cfg).fingerprint() != resumed["fingerprint"]:
            raise ConfigError("--scenario", args.scenario, f"differs from the scenario the run emulated "
                                                           f"({resumed['scenario']}); resume with that one")
        path, rows = run_with_console(args, lambda c, **kw: run_scenario(scenario, c, resume=True, **kw), cfg)
    else:
        cfg = config_from_args(args, scenario.config)
        path, rows = run_with_console(args, lambda c, **kw: run_scenario(scenario, c, **kw), cfg)
    last = rows[-1]
    metric = task_for(cfg).primary_metric
    print(f"fedpeft: {len(rows)} rounds of scenario {scenario.name}: {metric}={last[metric]:.4f}, "
          f"simulated {last['sim_clock']:.1f} s (real {sum(r['seconds'] for r in rows):.1f} s); "
          f"run directory: {path} (plots in {path / 'plots'}, timeline in {path / 'hetero_timeline.jsonl'})")
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from fedpeft.sim.hetero.profiles import load_catalogue
    from fedpeft.sim.hetero.scenario import scenario_names

    print(f"{'profile':<18}{'TFLOPS':>8}{'mem GB':>8}{'up Mb/s':>9}{'down Mb/s':>10}{'avail':>7}{'crash':>7}")
    for p in load_catalogue(*([args.profiles] if args.profiles else [])).values():
        print(f"{p.name:<18}{p.tflops:>8g}{p.memory_gb:>8g}{p.uplink_mbps:>9g}{p.downlink_mbps:>10g}"
              f"{p.availability:>7g}{p.crash_rate:>7g}")
    print("scenarios:", ", ".join(scenario_names()))
    return 0


register_command("simulate", _HELP, _add_args, _run)


def _profiles_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", metavar="FILE", default="", help="extra profiles TOML on top of the catalogue")


register_command("profiles", "list the heterogeneous device profiles and shipped scenarios", _profiles_args, _profiles)
