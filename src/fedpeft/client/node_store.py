"""What a node keeps on its own disk beside its ledger: its secret and its releases.

* ``client-<id>.secret`` -- the node secret (:class:`fedpeft.privacy.randomness.NodeSecret`, mode
  0600): the key of every DP random choice the node makes. Never sent, never logged. A
  deployed node keeps it in its own ``ledger-dir``. A simulated client's "disk" is this
  machine, but its ledger directory lies inside the run directory, which the server writes
  and others may read; so simulated clients keep their secrets outside it, under
  ``$FEDPEFT_SECRET_HOME`` (default ``~/.local/share/fedpeft/node-secrets``), in a folder
  named after a hash of the ledger directory -- which is how a resumed run finds them again.
* ``client-<id>.releases/round-<r>-<key>.npz`` -- every update the node released, one file
  per round and replay key (never overwritten), with its local (never sent) state. The
  replay key and a release's output hash are SHA-256 digests (:func:`digest`; the client's
  data enters through :func:`data_digest`).
* ``client-<id>.local/<run>/round-<r>.npz`` -- the node's local (never sent) state after round
  r of the run whose configuration hash starts with ``<run>`` (:func:`save_local`; FedSA-LoRA's
  B, ABMLL's posterior): a client process that starts afresh -- a resumed run, a restarted
  SuperNode -- continues from the state after its latest round before the one asked for
  (:func:`load_local`), not from a reset one; another run on the same ledger directory never
  sees it.

Why keep releases. A round can be asked for again: a retry after too few replies, a
resume after the server crashed, a late duplicate message. Re-sending what was already
released is post-processing of a DP output and costs nothing; recomputing it would be a
new release (and, with fresh randomness in ``privacy.secure_mode``, a different one that
the ledger would have to charge again). So a node answers a replayed round from this store.
Loaded with ``allow_pickle=False``: a store file cannot execute code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context

from fedpeft.data.sources import TextDataset
from fedpeft.io import load_array_groups, save_array_groups
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.randomness import NodeSecret

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

__all__ = ["StoredRelease", "data_digest", "digest", "load_local", "load_release", "node_secret", "save_local",
           "save_release", "secret_home", "secret_path"]

_SECRETS: dict[Path, NodeSecret] = {}
_STATE, _LOCAL = "state", "local"


def secret_home() -> Path:
    """Where simulated clients keep their secrets (module doc)."""
    raw = os.environ.get("FEDPEFT_SECRET_HOME", "")
    return Path(raw).expanduser() if raw else Path.home() / ".local" / "share" / "fedpeft" / "node-secrets"


def secret_path(ledger_dir: Path, client_id: str, deployed: bool) -> Path:
    """The file of this client's secret: beside a deployed node's ledger, else under :func:`secret_home`."""
    if deployed:
        return (ledger_dir / f"client-{client_id}.secret").resolve()
    run = hashlib.sha256(str(ledger_dir.resolve()).encode()).hexdigest()[:20]
    return (secret_home() / run / f"client-{client_id}.secret").resolve()


def node_secret(ledger_dir: Path, client_id: str, deployed: bool) -> NodeSecret:
    """This client's secret (created on first use), cached per process."""
    path = secret_path(ledger_dir, client_id, deployed)
    if path not in _SECRETS:
        _SECRETS[path] = NodeSecret.load_or_create(path)
    return _SECRETS[path]


def digest(*parts: str | Mapping[str, np.ndarray]) -> str:
    """SHA-256 over strings and named arrays (names, dtypes, shapes and bytes, in name order),
    every field length-prefixed so that no two different inputs frame to the same bytes."""
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big") + data)

    for part in parts:
        if isinstance(part, str):
            field(b"s" + part.encode())
            continue
        field(b"m" + str(len(part)).encode())
        for name in sorted(part):
            arr = np.ascontiguousarray(part[name])
            field(f"{name}|{arr.dtype}|{arr.shape}".encode())
            field(arr.tobytes())
    return h.hexdigest()


def data_digest(data: TextDataset) -> str:
    """SHA-256 of the node's examples -- every field of the dataset (texts and labels; an
    instruction set's responses, system prompts and earlier turns too), length-prefixed:
    a changed file is a new computation."""
    h = hashlib.sha256()

    def put(raw: bytes) -> None:
        h.update(len(raw).to_bytes(8, "big") + raw)

    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        put(f.name.encode())
        if isinstance(value, np.ndarray):
            put(np.ascontiguousarray(value).tobytes())
        else:
            put(json.dumps(value, ensure_ascii=False).encode())  # tuples of strings (nested for chat turns)
    return h.hexdigest()


@dataclass
class StoredRelease:
    """One released update and what it was computed from."""

    server_round: int
    replay_key: str
    output_hash: str
    state: dict[str, np.ndarray]
    local: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _path(ledger_dir: Path, client_id: str, server_round: int, replay_key: str) -> Path:
    """One file per (round, replay key): a release is never overwritten by another computation."""
    if not replay_key.isalnum():
        raise ValueError("a replay key is a hex digest")
    return ledger_dir / f"client-{client_id}.releases" / f"round-{server_round}-{replay_key[:32]}.npz"


def save_release(ledger_dir: Path, client_id: str, rel: StoredRelease) -> None:
    """Store ``rel`` atomically, in a file of its own (round and replay key)."""
    meta = {"round": rel.server_round, "replay_key": rel.replay_key, "output_hash": rel.output_hash,
            "metrics": rel.metrics}
    save_array_groups(_path(ledger_dir, client_id, rel.server_round, rel.replay_key), meta,
                      {_STATE: rel.state, _LOCAL: rel.local})


def load_release(ledger_dir: Path, client_id: str, server_round: int, replay_key: str) -> StoredRelease | None:
    """The stored release of ``server_round`` computed from ``replay_key``, if there is one."""
    path = _path(ledger_dir, client_id, server_round, replay_key)
    if not path.is_file():
        return None
    meta, groups = load_array_groups(path, (_STATE, _LOCAL))
    if meta.get("replay_key") != replay_key:
        return None
    return StoredRelease(int(meta["round"]), replay_key, str(meta["output_hash"]), groups[_STATE], groups[_LOCAL],
                         dict(meta.get("metrics", {})))


def _local_dir(ledger_dir: Path, client_id: str, run: str) -> Path:
    if not run.isalnum():
        raise ValueError("a run is named by its configuration hash (hex)")
    return ledger_dir / f"client-{client_id}.local" / run[:32]


def save_local(ledger_dir: Path, client_id: str, run: str, server_round: int, local: Mapping[str, np.ndarray]) -> None:
    """Store the local state after ``server_round`` of run ``run`` (its configuration hash)
    atomically, one file per round."""
    save_array_groups(_local_dir(ledger_dir, client_id, run) / f"round-{int(server_round)}.npz",
                      {"round": int(server_round)}, {_LOCAL: local})


def load_local(ledger_dir: Path, client_id: str, run: str, before: int) -> tuple[int, dict[str, np.ndarray]]:
    """``(round, local state)`` of run ``run``'s latest stored round before ``before``; ``(0, {})`` if none."""
    folder = _local_dir(ledger_dir, client_id, run)
    rounds = sorted(int(p.stem.split("-", 1)[1]) for p in folder.glob("round-*.npz")
                    if p.stem.split("-", 1)[1].isdigit()) if folder.is_dir() else []
    earlier = [r for r in rounds if r < before]
    if not earlier:
        return 0, {}
    _, groups = load_array_groups(folder / f"round-{earlier[-1]}.npz", (_LOCAL,))
    return earlier[-1], groups[_LOCAL]


LEDGER_STATE_KEY = "fedpeft-ledger"
"""Where a client keeps its ledger's JSON in ``Context.state`` (beside its file on disk)."""


def load_ledger(cfg: RunConfig, ledger_dir: Path, client: str, context: Context) -> Ledger:
    """The client's ledger: its file in ``ledger_dir`` and the copy in ``context.state`` (the
    newer wins, :meth:`Ledger.load_or_new`), or a new one for this run's target."""
    state = context.state.get(LEDGER_STATE_KEY)
    state_json = str(state["json"]) if isinstance(state, ConfigRecord) and "json" in state else None
    return Ledger.load_or_new(
        ledger_dir / f"client-{client}.json", state_json,
        client=client, target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )


def save_ledger(ledger: Ledger, ledger_dir: Path, client: str, context: Context) -> None:
    """Write the ledger to its file and to ``context.state`` (what :func:`load_ledger` reads)."""
    ledger.save(ledger_dir / f"client-{client}.json")
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
