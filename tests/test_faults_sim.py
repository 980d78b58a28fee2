"""Injected client faults through the real Flower simulation: crashes and timeouts are
logged, rounds with too few valid replies are retried (same global state) or skipped,
and nothing becomes NaN."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.sim.faults import draw_fault
from fedpeft.sim.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy", ["retry", "skip"])
def test_faulty_clients_are_retried_or_skipped(tiny_cfg, tmp_path: Path, policy: str) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, rounds=4),
        faults=dataclasses.replace(tiny_cfg.faults, fail_rate=0.5, min_clients=2, on_too_few=policy, max_retries=2),
    )
    run, rows = simulate(cfg, tmp_path / policy)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    log = (run / "server.log").read_text()
    for row in rows:
        assert math.isfinite(row["accuracy"]) and math.isfinite(row["loss"])
        # the server saw exactly the failures the seeded draws predict for the attempt it kept
        attempt = row["attempts"] - 1
        expected = [c for c in range(3) if draw_fault(0.5, cfg.seed, row["round"], attempt, str(c))]
        assert len(row["failed"]) == len(expected), row  # crashes are named by node, timeouts by client
        if row["skipped"]:
            assert len(expected) > 1 and row["clients_accepted"] == 0 and row["train_loss"] is None
        else:
            assert row["clients_accepted"] == 3 - len(expected) >= 2
    if policy == "skip":
        assert all(r["attempts"] == 1 for r in rows)
    assert any(r["failed"] for r in rows), "fail_rate=0.5 over 4 rounds injected nothing"
    if any(r["skipped"] for r in rows):
        assert "skipped after" in log
    if any(r["attempts"] > 1 for r in rows):
        assert "retrying with the same global state" in log
    state = load_checkpoint(run / "checkpoint.npz").state
    assert all(np.isfinite(v).all() for v in state.values())
