"""Resume is exact (fast, in-process): a DP run that the server loses in round 2 and that is
resumed from the round-1 checkpoint ends with the same global state, the same ``metrics.jsonl``
rows and the same client ledgers, bit for bit, as the same run left alone.

The real round loop (:func:`fedpeft.server.loop.run_federation`) drives the real ClientApp through
:class:`inprocess_grid.LocalGrid`: no Ray, no subprocess (the slow SIGKILL test,
``tests/test_resume_kill.py``, covers a killed process). Three clients, two sampled per round, so
the strategy's client sampler (checkpointed strategy state) decides who trains after the resume.
The crash comes after round 2's clients trained and spent, before its checkpoint: the resumed
round 2 is a replay the clients answer from their stored releases and their ledgers charge once.
The interrupted run's clients get the reference run's node secrets (their DP noise and Poisson
draws are keyed by them), so equal inputs give equal releases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess_grid import LocalGrid

from fedpeft.client.node_store import secret_path
from fedpeft.load import parse_config
from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.server.loop import RoundHook, run_federation

CLIENTS, ROUNDS, CRASH_IN = 3, 3, 2
TIMING = {"seconds"}  # the one wall-clock field of a metrics row


class Crash(RoundHook):
    """Raises at the end of round ``crash_in`` (after aggregation, before its checkpoint)."""

    def __init__(self, crash_in: int) -> None:
        self.crash_in = crash_in

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        if server_round == self.crash_in:
            raise RuntimeError("server lost")


def _cfg(model: Path, out: Path):  # type: ignore[no-untyped-def]
    return parse_config({
        "model.path": str(model), "model.max_length": 16, "data.examples_per_client": 16, "data.test_size": 16,
        "train.clients": CLIENTS, "train.clients_per_round": 2, "train.rounds": ROUNDS, "train.batch_size": 16,
        "train.local_steps": 1, "privacy.epsilon": 0.5, "output_dir": str(out),
    })


def _ledgers(run: Path) -> dict[str, Any]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run / "ledger").glob("client-*.json"))}


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _same(a: Any, b: Any) -> bool:
    """Equal trees; arrays equal bit for bit (dtype, shape, bytes)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _share_secrets(reference: Path, run: Path) -> None:
    """Give ``run``'s simulated clients the node secrets ``reference``'s clients used."""
    for pid in range(CLIENTS):
        src, dst = (secret_path(r / "ledger", str(pid), deployed=False) for r in (reference, run))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def test_a_resumed_run_equals_the_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path,
                                                    flwr_identity) -> None:  # type: ignore[no-untyped-def]
    reference, run = tmp_path / "reference", tmp_path / "run"
    ref_rows = run_federation(LocalGrid(CLIENTS), _cfg(tiny_model_dir, reference), reference)  # type: ignore[arg-type]
    _share_secrets(reference, run)
    cfg = _cfg(tiny_model_dir, run)
    with pytest.raises(RuntimeError, match="server lost"):
        run_federation(LocalGrid(CLIENTS), cfg, run, hooks=[Crash(CRASH_IN)])  # type: ignore[arg-type]
    assert load_checkpoint(run / "checkpoint.npz").server_round == CRASH_IN - 1
    # fresh client processes (empty Context.state): the clients' own disks carry their ledgers
    rows = run_federation(LocalGrid(CLIENTS), cfg, run, resume=True)  # type: ignore[arg-type]

    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in ref_rows]
    assert _metrics(run) == _metrics(reference)
    got, want = load_checkpoint(run / "checkpoint.npz"), load_checkpoint(reference / "checkpoint.npz")
    assert got.server_round == want.server_round == ROUNDS
    assert sorted(got.state) == sorted(want.state)
    assert _same(got.state, want.state)
    assert _same(got.strategy, want.strategy)  # the sampler's RNG and the kept release
    assert _ledgers(run) == _ledgers(reference) and len(_ledgers(run)) == CLIENTS
    # the run was not trivially equal: the clients trained and spent
    assert all(r["epsilon"] > 0 and r["clients_accepted"] == 2 for r in rows)
    assert not all(np.array_equal(v, np.zeros_like(v)) for v in got.state.values())
