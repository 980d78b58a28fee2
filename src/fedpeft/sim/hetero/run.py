"""Run one scenario through the real Flower simulation (``fedpeft simulate --scenario``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.sim.hetero.hook import HeteroEmulator
from fedpeft.sim.hetero.scenario import Scenario

__all__ = ["run_scenario"]


def run_scenario(scenario: Scenario, cfg: RunConfig, run_dir: Path | None = None,
                 backend: dict[str, Any] | None = None, resume: bool = False,
                 **options: Any) -> tuple[Path, list[dict[str, Any]]]:
    """Simulate ``cfg`` with ``scenario``'s devices; return the run directory and its rows.

    The emulator is both a round hook and the deadline wrapper's round timer; ``resume``
    continues the run in ``run_dir`` from its checkpoint, emulator state included (the
    scenario must be the run's own: its fingerprint is checked). The emulator is built where
    the server loop runs (on the default runtime: Flower's simulation process, from the
    scenario); ``options`` are :func:`~fedpeft.sim.simulate.simulate`'s (runtime, progress, verbose).

    Ray resources are :func:`fedpeft.sim.simulate.backend_config`'s: a GPU fraction per
    client actor when CUDA is present, CPU otherwise (the emulation is the same either
    way; only the server's measured step cost that gets scaled differs, so set
    ``host_profile`` to the machine the run is on).
    """
    from fedpeft.sim.simulate import simulate

    HeteroEmulator(scenario, cfg)  # a scenario that does not fit the configuration fails here, in one line
    return simulate(cfg, run_dir, scenario=scenario, backend=backend, resume=resume, **options)
