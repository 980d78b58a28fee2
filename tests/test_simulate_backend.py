"""Ray resources for the simulation: no core sits idle while a round's clients wait."""

from __future__ import annotations

import dataclasses

import pytest

from fedpeft.sim import simulate as sim


@pytest.mark.parametrize(("clients", "per_round", "cores", "actors"),
                         [(3, 0, 2, 3), (4, 0, 2, 4), (10, 0, 2, 2), (1000, 10, 2, 2), (1000, 10, 16, 10), (1, 0, 2, 1)])
def test_actor_pool_runs_a_small_round_at_once(tiny_cfg, monkeypatch, clients, per_round, cores, actors) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, clients=clients,
                                                                   clients_per_round=per_round))
    monkeypatch.setattr(sim.os, "cpu_count", lambda: cores)
    assert sim.concurrent_clients(cfg, cores) == actors
    backend = sim.backend_config(dataclasses.replace(cfg, device="cpu"))
    share = backend["client_resources"]["num_cpus"]
    assert int(cores / share) == actors  # Flower's own pool-size formula
    assert backend["init_args"]["num_cpus"] == cores
