"""ICM-LoRA's options (``--set adapter.options.KEY=VALUE``), read by the client and server halves.

* ``tv_noise`` (default 5): noise multiplier of the one-off task-vector release;
* ``heldout_task`` (default ``none``): a shipped task no client trains on, for which the server
  generates an adapter each round (needs a multi-task run and ``tasks.public_size >= 10``);
* ``snapshot_window`` (default 3): rounds of (task vector, B) pairs the CVAE trains on;
* ``cvae_steps`` (default 400): Adam steps of each round's CVAE fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.adapters.options import option
from fedpeft.config import ConfigError, RunConfig
from fedpeft.config.tasks import SHIPPED_TASKS

__all__ = ["IcmOptions"]


def _heldout(value: str, cfg: RunConfig) -> str:
    """The held-out task's name, or "" for none; ConfigError unless it is a shipped task that
    no client of this multi-task run trains and the server holds a labelled sample of it."""
    name = value.strip()
    if name in ("", "none"):
        return ""
    run = [s.name for s in cfg.tasks.resolved()]
    free = [t for t in SHIPPED_TASKS if t not in run]
    if not cfg.tasks.enabled:
        raise ConfigError("adapter.options.heldout_task", name, "needs a multi-task run (--tasks ...)")
    if name not in free:
        why = "is trained by the run's clients" if name in run else "is not a shipped task"
        raise ConfigError("adapter.options.heldout_task", name,
                          f"{why}; allowed: none, {', '.join(free) or '(every shipped task is in the run)'}")
    if cfg.tasks.public_size < 10:
        raise ConfigError("tasks.public_size", cfg.tasks.public_size,
                          "the held-out task needs a server-held labelled sample: use >= 10")
    return name


@dataclass(frozen=True, kw_only=True)
class IcmOptions:
    """See the module docstring; ``heldout_task`` is "" when there is none."""

    tv_noise: float = option(5.0, low=0.1, high=1e4)
    heldout_task: str = option("none", check=_heldout)
    snapshot_window: int = option(3, low=1, high=1000)
    cvae_steps: int = option(400, low=1, high=100_000)
