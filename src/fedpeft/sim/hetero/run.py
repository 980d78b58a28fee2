"""Run one scenario through the real Flower simulation (``fedpeft simulate --scenario``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.sim.hetero.hook import HeteroEmulator
from fedpeft.sim.hetero.scenario import Scenario

__all__ = ["run_scenario"]


def run_scenario(scenario: Scenario, cfg: RunConfig, run_dir: Path | None = None,
                 backend: dict[str, Any] | None = None, resume: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """Simulate ``cfg`` with ``scenario``'s devices; return the run directory and its rows.

    The emulator is both a round hook and the deadline wrapper's round timer; ``resume``
    continues the run in ``run_dir`` from its checkpoint, emulator state included (the
    scenario must be the run's own: its fingerprint is checked).

    Ray resources are :func:`fedpeft.sim.simulate.backend_config`'s: a GPU fraction per
    client actor when CUDA is present, CPU otherwise (the emulation is the same either
    way; only the server's measured step cost that gets scaled differs, so set
    ``host_profile`` to the machine the run is on).
    """
    from fedpeft.sim.simulate import simulate

    emulator = HeteroEmulator(scenario, cfg)
    return simulate(cfg, run_dir, hooks=[emulator], round_timer=emulator, backend=backend, resume=resume)
