"""Per-round server checkpoints: what ``fedpeft simulate --resume RUN_DIR`` continues from.

After every completed round the server writes ``DIR/checkpoint.npz`` holding

* the global trainable state (what the next round would send) and the strategy's state
  (the previous aggregate that plugins such as TriAdaptLoRA carry their rank masks in);
  under client-level central DP both are the *noised* release -- the clipped, un-noised
  aggregate is never kept by the strategy (:mod:`fedpeft.strategies.central_dp`), so nothing in
  the run directory lets its reader subtract the central noise (:func:`round_checkpoint`);
* the round number, the configuration hash, the server's sampling RNG state;
* the metrics rows so far and the per-client epsilon table, so ``metrics.jsonl`` can be
  rewritten to exactly the checkpointed rounds on resume.

The file is written to a temporary name in the same directory, flushed, fsync'ed and
renamed over the old one (:func:`save_checkpoint`): a crash in the middle of a write leaves
the previous checkpoint intact. Only plain arrays and one JSON string are stored
(``allow_pickle=False`` on load), so a checkpoint cannot execute code.

Client ledgers are not part of the checkpoint: they live in ``DIR/ledger/`` (or on each
SuperNode), are only ever appended to, and a resume never rewrites them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.privacy.ledger import load_array_groups, save_array_groups

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "load_checkpoint", "round_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
_STATE, _PREV = "state", "previous"  # array groups: state/<name>, previous/<name>


@dataclass
class Checkpoint:
    """The server's complete state after ``server_round`` rounds."""

    server_round: int
    config_hash: str
    state: dict[str, np.ndarray]
    previous: dict[str, np.ndarray] = field(default_factory=dict)
    rng_state: Any = None  # random.Random.getstate() of the strategy's client sampler
    rows: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    accountants: list[str] = field(default_factory=list)


def round_checkpoint(
    server_round: int, config_hash: str, state: dict[str, np.ndarray], strategy: Any,
    rows: list[dict[str, Any]], epsilon: dict[str, float], accountants: list[str],
) -> Checkpoint:
    """What the round loop saves after ``server_round``: the global ``state`` it will send next,
    and from the innermost strategy (an ``AdapterAvg``) its ``previous`` and sampler RNG state.

    ``state`` and ``previous`` are what the server released; under central DP that is the
    noised aggregate for both (the un-noised one is never assigned to ``previous``).
    """
    return Checkpoint(server_round, config_hash, dict(state), dict(strategy.previous), strategy.rng.getstate(),
                      list(rows), dict(epsilon), list(accountants))


def _rng_to_json(state: Any) -> Any:
    if state is None:
        return None
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(raw: Any) -> Any:
    if raw is None:
        return None
    version, internal, gauss = raw
    state = (int(version), tuple(int(x) for x in internal), gauss)
    random.Random().setstate(state)  # validates the shape now, not at the first sample
    return state


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically (temporary file + fsync + rename)."""
    from fedpeft.server.run_dir import jsonable

    meta = {
        "format": FORMAT_VERSION,
        "server_round": ckpt.server_round,
        "config_hash": ckpt.config_hash,
        "rng_state": _rng_to_json(ckpt.rng_state),
        "rows": jsonable(ckpt.rows),
        "epsilon": jsonable(ckpt.epsilon),
        "accountants": sorted(ckpt.accountants),
    }
    save_array_groups(path, meta, {_STATE: ckpt.state, _PREV: ckpt.previous})


def _unjson(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (ValueError if unreadable)."""
    try:
        meta, groups = load_array_groups(path, (_STATE, _PREV))
        state, previous = groups[_STATE], groups[_PREV]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable fedpeft checkpoint ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this fedpeft reads {FORMAT_VERSION}")
    return Checkpoint(
        server_round=int(meta["server_round"]),
        config_hash=str(meta["config_hash"]),
        state=state,
        previous=previous,
        rng_state=_rng_from_json(meta.get("rng_state")),
        rows=_unjson(meta.get("rows", [])),
        epsilon={k: float(v) for k, v in _unjson(meta.get("epsilon", {})).items()},
        accountants=list(meta.get("accountants", [])),
    )
