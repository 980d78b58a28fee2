"""Injected client faults: crashes and timeouts are logged, rounds with too few valid replies
are retried (same global state) or skipped, and nothing becomes NaN.

The fault draws are a pure function of (seed, round, attempt, client) (:func:`draw_fault`), so
with seed 0, ``fail_rate = 0.5``, 3 clients, ``min_clients = 2`` and ``max_retries = 2`` the
rounds' outcomes are known exactly (``EXPECTED``): under ``retry`` round 1 goes through at once,
round 2 on its second attempt, round 3 is skipped after three, round 4 goes through at once;
under ``skip`` rounds 2 and 3 are skipped. The fast test runs the real round loop and the
simulator's ClientApp (with its fault mod) in-process (``tests/inprocess_grid.py``); the slow one
runs the same configuration through the real Flower simulation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inprocess_grid import LocalGrid

import fedpeft.wire as wire
from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.server.loop import RoundHook, run_federation
from fedpeft.sim.faults import draw_fault
from fedpeft.sim.mods import simulation_app
from fedpeft.sim.simulate import simulate

CLIENTS, ROUNDS = 3, 4
EXPECTED = {  # policy: [(attempts, skipped) per round]
    "retry": [(1, False), (2, False), (3, True), (1, False)],
    "skip": [(1, False), (1, True), (1, True), (1, False)],
}


def _cfg(tiny_cfg, policy: str):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, rounds=ROUNDS, clients=CLIENTS),
        faults=dataclasses.replace(tiny_cfg.faults, fail_rate=0.5, min_clients=2, on_too_few=policy, max_retries=2),
    )


def _faults(cfg, server_round: int, attempt: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [c for c in range(CLIENTS) if draw_fault(0.5, cfg.seed, server_round, attempt, str(c))]


def _check_rows(cfg, rows: list[dict[str, Any]], log: str, policy: str) -> None:  # type: ignore[no-untyped-def]
    assert cfg.seed == 0  # EXPECTED is for seed 0's draws
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [(r["attempts"], r["skipped"]) for r in rows] == EXPECTED[policy]
    for row in rows:
        assert math.isfinite(row["accuracy"]) and math.isfinite(row["loss"])
        # the server saw exactly the failures the seeded draws predict for the attempt it kept
        expected = _faults(cfg, row["round"], row["attempts"] - 1)
        assert len(row["failed"]) == len(expected), row  # crashes are named by node, timeouts by client
        if row["skipped"]:
            assert len(expected) > 1 and row["clients_accepted"] == 0 and row["train_loss"] is None
        else:
            assert row["clients_accepted"] == CLIENTS - len(expected) >= 2
    retries = [(r["round"], a + 1) for r in rows for a in range(1, r["attempts"])]
    for server_round, attempt in retries:
        assert f"round {server_round}: retrying with the same global state (attempt {attempt} of 3)" in log
    for row in rows:
        assert (f"round {row['round']}: skipped after {row['attempts']} attempt(s)" in log) == row["skipped"]


class States(RoundHook):
    """Every round's global state at its end."""

    def __init__(self) -> None:
        self.setup: Any = None
        self.states: dict[int, dict[str, np.ndarray]] = {}

    def on_start(self, setup: Any, strategy: Any, run_dir: Any) -> None:
        self.setup = setup

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        self.states[server_round] = {k: v.copy() for k, v in self.setup.state.items()}


@pytest.mark.parametrize("policy", ["retry", "skip"])
def test_retries_and_skips_follow_the_seeded_draws(tiny_cfg, tmp_path: Path, policy: str,  # type: ignore[no-untyped-def]
                                                   flwr_identity) -> None:
    """Fast: the exact attempts and skips; every attempt of a round sends the same global state
    to all clients; a skipped round leaves the global state as it was."""
    cfg = _cfg(tiny_cfg, policy)
    cfg = dataclasses.replace(  # smaller and without DP: the round loop's policy is under test here
        cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=math.inf),
        data=dataclasses.replace(cfg.data, examples_per_client=32, test_size=16),
        model=dataclasses.replace(cfg.model, max_length=16),
        train=dataclasses.replace(cfg.train, batch_size=16, local_steps=1))
    grid, states = LocalGrid(CLIENTS, app=simulation_app()), States()
    rows = run_federation(grid, cfg, tmp_path / policy, hooks=[states])  # type: ignore[arg-type]
    _check_rows(cfg, rows, (tmp_path / policy / "server.log").read_text(), policy)
    assert len(grid.sent) == CLIENTS * sum(a for a, _ in EXPECTED[policy])  # every attempt asks every client
    sent = iter(grid.sent)
    for row in rows:
        attempts = [[next(sent) for _ in range(CLIENTS)] for _ in range(row["attempts"])]
        first = attempts[0][0].content[wire.ARRAYS]
        for msg in (m for a in attempts for m in a):
            assert all(np.array_equal(msg.content[wire.ARRAYS][k].numpy(), first[k].numpy()) for k in first)
        if row["skipped"]:
            previous = states.states.get(row["round"] - 1)
            now = states.states[row["round"]]
            assert previous is not None and all(np.array_equal(now[k], previous[k]) for k in now)


@pytest.mark.slow
@pytest.mark.guarantee
@pytest.mark.parametrize("policy", ["retry", "skip"])
def test_faulty_clients_are_retried_or_skipped(tiny_cfg, tmp_path: Path, policy: str) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_cfg, policy)
    run, rows = simulate(cfg, tmp_path / policy)
    _check_rows(cfg, rows, (run / "server.log").read_text(), policy)
    state = load_checkpoint(run / "checkpoint.npz").state
    assert all(np.isfinite(v).all() for v in state.values())
