"""Per-round server checkpoints: what ``fedpeft simulate --resume RUN_DIR`` continues from.

After every completed round the server writes ``DIR/checkpoint.npz`` holding

* the global trainable state (what the next round would send);
* the state of every stateful component, each asked for its own ``state_dict()``
  (:mod:`fedpeft.strategies.state`): every strategy of the chain, outermost first (the base
  strategy's previous release -- where plugins such as TriAdaptLoRA carry their rank masks --
  and its client sampler's RNG; a deadline wrapper's policy), and every stateful round hook by
  name (a heterogeneous-device emulator's simulated clock, timeline and cost model; the
  client-level central-DP accountant's composed releases);
* the round number, the configuration hash, the metrics rows so far and the per-client
  epsilon table, so ``metrics.jsonl`` can be rewritten to exactly the checkpointed rounds on
  resume (:func:`restore` gives every component its state back).

Under client-level central DP the global state and the base strategy's previous release are
both the *noised* release -- the clipped, un-noised aggregate is never kept
(:mod:`fedpeft.strategies.central_dp`) -- and the central-DP wrapper's state is empty: its
noise generator is seeded from OS entropy in each process and never saved, so nothing in the
run directory lets its reader subtract or regenerate the central noise.

The file is written to a temporary name in the same directory, flushed, fsync'ed and
renamed over the old one (:func:`save_checkpoint`): a crash in the middle of a write leaves
the previous checkpoint intact. Only plain arrays and one JSON string are stored
(``allow_pickle=False`` on load), so a checkpoint cannot execute code. Arrays inside a
component's state are stored as ``parts/<component path>/<name>``, the rest in the JSON.

Client ledgers are not part of the checkpoint: they live in ``DIR/ledger/`` (or on each
SuperNode), are only ever appended to, and a resume never rewrites them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.io import load_array_groups, save_array_groups
from fedpeft.server.run_dir import jsonable
from fedpeft.strategies.state import StateDict, Stateful, chain_state_dict, load_chain_state_dict, sampler_from_json

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "hook_states", "load_checkpoint", "restore", "round_checkpoint",
           "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 2
_STATE, _PARTS = "state", "parts"  # array groups: state/<name>, parts/<component path>/<name>
_ARRAY = "__array__"  # JSON marker of an array stored beside the JSON


@dataclass
class Checkpoint:
    """The server's complete state after ``server_round`` rounds."""

    server_round: int
    config_hash: str
    state: dict[str, np.ndarray]
    strategy: list[list[Any]] = field(default_factory=list)  # [[class name, state dict or None], ...]
    hooks: dict[str, StateDict] = field(default_factory=dict)  # stateful round hooks' state, by name
    rows: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    accountants: list[str] = field(default_factory=list)

    def _base(self) -> StateDict:
        return (self.strategy[-1][1] or {}) if self.strategy else {}

    @property
    def previous(self) -> dict[str, np.ndarray]:
        """The base strategy's kept release (AdapterAvg's ``previous``), for readers and audits."""
        return dict(self._base().get("previous", {}))

    @property
    def rng_state(self) -> Any:
        """The base strategy's client-sampler state (``random.Random.getstate()``), or None."""
        raw = self._base().get("sampler")
        return None if raw is None else sampler_from_json(raw)


def _hook_names(hooks: Sequence[Any]) -> list[tuple[str, Stateful]]:
    """``(name, hook)`` of every stateful hook: its class name, ``#2``, ``#3`` ... for repeats."""
    out: list[tuple[str, Stateful]] = []
    seen: dict[str, int] = {}
    for hook in hooks:
        if isinstance(hook, Stateful):
            name = type(hook).__name__
            seen[name] = seen.get(name, 0) + 1
            out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", hook))
    return out


def hook_states(hooks: Sequence[Any]) -> dict[str, StateDict]:
    """Every stateful round hook's ``state_dict()``, by name."""
    return {name: hook.state_dict() for name, hook in _hook_names(hooks)}


def round_checkpoint(
    server_round: int, config_hash: str, state: dict[str, np.ndarray], strategy: Any,
    rows: list[dict[str, Any]], epsilon: dict[str, float], accountants: list[str], hooks: Sequence[Any] = (),
) -> Checkpoint:
    """What the round loop saves after ``server_round``: the global ``state`` it will send next
    and the state of ``strategy`` (the whole chain) and of every stateful hook.

    ``state`` is what the server released; under central DP the noised aggregate (and so is
    the base strategy's ``previous``: the un-noised one is never kept).
    """
    return Checkpoint(server_round, config_hash, dict(state), chain_state_dict(strategy), hook_states(hooks),
                      list(rows), dict(epsilon), list(accountants))


def restore(ckpt: Checkpoint, strategy: Any, hooks: Sequence[Any]) -> None:
    """Give the strategy chain and every stateful hook their checkpointed state back
    (ValueError when the checkpoint's components are not this run's)."""
    load_chain_state_dict(strategy, ckpt.strategy)
    named = dict(_hook_names(hooks))
    extra, missing = sorted(set(ckpt.hooks) - set(named)), sorted(set(named) - set(ckpt.hooks))
    if extra:
        raise ValueError(f"the checkpoint holds the state of {', '.join(extra)}, which this run does not have "
                         "(a heterogeneous scenario or central DP the run had); resume the run as it was started")
    if missing:
        raise ValueError(f"the checkpoint holds no state for {', '.join(missing)}, which the run did not have; "
                         "resume the run as it was started")
    for name, hook in named.items():
        hook.load_state_dict(ckpt.hooks[name])


def _pack(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON, each array moved to ``arrays[path/...]`` and left as a marker."""
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {_ARRAY: path}
    if isinstance(value, dict):
        return {str(k): _pack(v, f"{path}/{k}", arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]
    return jsonable(value)


def _unpack(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[str(value[_ARRAY])]
        return {k: _unpack(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    return _unjson(value)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically (temporary file + fsync + rename)."""
    parts: dict[str, np.ndarray] = {}
    chain = {f"{i}.{name}": state for i, (name, state) in enumerate(ckpt.strategy)}
    meta = {
        "format": FORMAT_VERSION,
        "server_round": ckpt.server_round,
        "config_hash": ckpt.config_hash,
        "strategy": _pack(chain, "strategy", parts),
        "hooks": _pack(ckpt.hooks, "hooks", parts),
        "rows": jsonable(ckpt.rows),
        "epsilon": jsonable(ckpt.epsilon),
        "accountants": sorted(ckpt.accountants),
    }
    save_array_groups(path, meta, {_STATE: ckpt.state, _PARTS: parts})


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
        meta, groups = load_array_groups(path, (_STATE, _PARTS))
        state, parts = groups[_STATE], groups[_PARTS]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable fedpeft checkpoint ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this fedpeft reads {FORMAT_VERSION}")
    try:
        chain = _unpack(meta.get("strategy", {}), parts)
        strategy = [[key.split(".", 1)[1], chain[key]] for key in sorted(chain, key=lambda k: int(k.split(".")[0]))]
        hooks = _unpack(meta.get("hooks", {}), parts)
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable fedpeft checkpoint (component state: {exc})") from None
    return Checkpoint(
        server_round=int(meta["server_round"]),
        config_hash=str(meta["config_hash"]),
        state=state,
        strategy=strategy,
        hooks=hooks,
        rows=_unjson(meta.get("rows", [])),
        epsilon={k: float(v) for k, v in _unjson(meta.get("epsilon", {})).items()},
        accountants=list(meta.get("accountants", [])),
    )
