"""A deployed node's own privacy limits, from its node config (never from the server).

The owner of a node decides what may ever be spent on its data, whatever the server asks:

* ``max-epsilon`` -- the most this node's ledger may ever reach (example-level, the
  ledger's neighbouring relation and accountant);
* ``max-delta`` -- the delta at which that cap holds (default 1e-5). The cap is evaluated
  at the node's delta, not the server's: a server asking for delta = 0.5 gets a tiny sigma
  that "fits" epsilon = 8 at its own delta and is epsilon = 64 at 1e-5. A run whose delta is
  above the node's is refused outright;
* ``min-noise-multiplier`` -- optional floor on the sigma the node will train with.

The check is on the run's plan: the node's ledger (all its history on this disk, across
runs) plus this round and every remaining round at the planned sigma. A capped node refuses
a run without DP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import fedpeft.wire as wire
from fedpeft.privacy.accounting import epsilon_for

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft.config import RunConfig
    from fedpeft.privacy.ledger import Ledger

__all__ = ["DEFAULT_NODE_DELTA", "node_budget_refusal", "node_delta_refusal"]

DEFAULT_NODE_DELTA = 1e-5


def _number(node_config: Mapping[str, Any], key: str) -> float | None | str:
    """The node-config value ``key`` as a float, None when unset, or a refusal text."""
    raw = node_config.get(key)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(str(raw))
    except (TypeError, ValueError):
        return f"node config {key}={raw!r} is not a number; refusing to train"
    if not math.isfinite(value) or value <= 0:
        return f"node config {key}={raw!r} must be a positive number; refusing to train"
    return value


def _node_delta(node_config: Mapping[str, Any]) -> float:
    """The delta at which this node's limits hold (``max-delta``, default 1e-5)."""
    delta = _number(node_config, wire.MAX_DELTA)
    return delta if isinstance(delta, float) else DEFAULT_NODE_DELTA


def _delta_refusal(cfg: RunConfig, node_delta: float) -> str:
    if cfg.privacy.delta > node_delta:
        return (f"the run's delta={cfg.privacy.delta:g} is above this node's max-delta={node_delta:g}; "
                f"refusing to train")
    return ""


def node_delta_refusal(node_config: Mapping[str, Any], cfg: RunConfig) -> str:
    """Why this capped node refuses the run's delta outright (before any calibration), or ""."""
    if _number(node_config, wire.MAX_EPSILON) is None or not cfg.privacy.enabled:
        return ""
    return _delta_refusal(cfg, _node_delta(node_config))


def node_budget_refusal(node_config: Mapping[str, Any], cfg: RunConfig, ledger: Ledger | None, steps: int,
                        server_round: int) -> str:
    """Why this node refuses the run under its own limits (module doc), or ""."""
    cap, delta, floor = (_number(node_config, k) for k in (wire.MAX_EPSILON, wire.MAX_DELTA, wire.MIN_NOISE_MULTIPLIER))
    for value in (cap, delta, floor):
        if isinstance(value, str):
            return value
    if cap is None and floor is None:
        return ""
    node_delta = _node_delta(node_config)
    if ledger is None:
        limit = f"allows at most epsilon={cap:g}" if cap is not None else f"requires min-noise-multiplier={floor:g}"
        return f"this node {limit} and the run has no DP (privacy.epsilon=inf)"
    if not node_delta < 1:
        return f"node config max-delta={node_delta:g} must be below 1; refusing to train"
    if refusal := _delta_refusal(cfg, node_delta):
        return refusal
    if isinstance(floor, float) and ledger.noise_multiplier < floor:
        return (f"the run's sigma={ledger.noise_multiplier:.4f} is below this node's "
                f"min-noise-multiplier={floor:g}; refusing to train")
    if not isinstance(cap, float):
        return ""
    remaining = steps * (cfg.train.rounds - server_round + 1)
    planned, acc = epsilon_for([*ledger.history, (ledger.noise_multiplier, ledger.sample_rate, remaining),
                                *ledger.reserved_history],
                               node_delta, ledger.accountant, relation=ledger.relation)
    if planned > cap:
        return (f"client {ledger.client}: the run's plan (rounds {server_round}..{cfg.train.rounds}, {remaining} steps "
                f"at sigma={ledger.noise_multiplier:.4f}) would reach epsilon={planned:.3f} > this node's cap "
                f"max-epsilon={cap:g} (example-level, {ledger.relation}, delta={node_delta:g}, {acc})")
    return ""
