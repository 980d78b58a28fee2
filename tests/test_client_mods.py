"""Simulation-only behaviour lives in the simulator's ClientApp mods, not in the real client.

The deployed ClientApp (``fedpeft.client.app:app``) injects no faults whatever ``faults.*``
says, and refuses a round that carries the simulator's ``hetero-plan``; the simulator's app
(:func:`fedpeft.sim.mods.simulation_app`) injects faults (tests/test_reliability.py) and hands
a client its emulated device (physical batch, rank tier) through ``Context.state``.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

import fedpeft.wire as wire
from fedpeft.client.app import app as deployed_app
from fedpeft.config import config_hash, config_to_toml
from fedpeft.server.loop import ServerSetup
from fedpeft.sim.faults import draw_fault
from fedpeft.sim.mods import simulation_app
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord

CLIENT_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedpeft" / "client"


def _server(cfg, tmp_path: Path):  # type: ignore[no-untyped-def]
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(tmp_path / "ledger")})
    return setup, strategy


def _message(setup, strategy, server_round: int, plan: str = "") -> Message:  # type: ignore[no-untyped-def]
    conf = strategy.round_config(server_round)
    if plan:
        conf["hetero-plan"] = plan
    content = RecordDict({"arrays": state_to_arrayrecord(setup.state), "config": conf})
    return Message(content=content, dst_node_id=7, message_type="train")


def _ctx(pid: int = 0, **node) -> Context:  # type: ignore[no-untyped-def]
    config = node or {"partition-id": pid, "num-partitions": 3}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_the_client_package_imports_nothing_of_the_simulator() -> None:
    files = sorted(CLIENT_PACKAGE.glob("*.py"))
    assert files, CLIENT_PACKAGE
    for path in files:
        sim = [n for n in _imported_modules(path) if n == "fedpeft.sim" or n.startswith("fedpeft.sim.")]
        assert not sim, f"{path.name} imports {sim}: simulation-only code belongs in fedpeft.sim.mods"


def test_the_deployed_app_injects_no_faults(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """The same configuration that crashes one client and loses another's reply in the
    simulator (tests/test_reliability.py) trains both with the deployed app."""
    cfg = dataclasses.replace(tiny_cfg, faults=dataclasses.replace(tiny_cfg.faults, fail_rate=0.9))
    setup, strategy = _server(cfg, tmp_path)
    rnd, kinds = next((r, k) for r in range(1, 100)
                      if {"crash", "timeout"} <= set(k := [draw_fault(0.9, cfg.seed, r, 0, str(p)) for p in range(3)]))
    for pid in (kinds.index("crash"), kinds.index("timeout")):
        reply = deployed_app(_message(setup, strategy, rnd), _ctx(pid))
        assert "status" not in reply.content and isinstance(reply.content["arrays"], ArrayRecord)
        assert set(reply.content["arrays"].keys()) == set(setup.spec.tensors)


def _plan(physical_batch: int, rank: int, skip: dict[str, str] | None = None) -> str:
    return wire.encode_hetero_plan(["Small"], [0, 0, 0], {"Small": (physical_batch, rank)}, skip or {})


@pytest.fixture()
def hetero_cfg(tiny_cfg):  # type: ignore[no-untyped-def]
    """Rank tiers need a plugin with ``set_client_rank`` (ffa_lora_hetero); one round."""
    return dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, method="ffa_lora_hetero"),
                               train=dataclasses.replace(tiny_cfg.train, rounds=1, local_steps=1))


def test_the_simulator_hands_a_client_its_device(hetero_cfg, tmp_path: Path, flwr_identity,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Physical batch and rank tier reach the training step; the directive lasts one call."""
    from fedpeft.client import app as client_app

    seen: list[int] = []
    real = client_app.train_local

    def spy(model, plugin, tokenizer, data, cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(cfg.train.physical_batch_size)
        return real(model, plugin, tokenizer, data, cfg, *args, **kwargs)

    monkeypatch.setattr(client_app, "train_local", spy)
    setup, strategy = _server(hetero_cfg, tmp_path)
    ctx = _ctx(0)
    reply = simulation_app()(_message(setup, strategy, 1, _plan(8, 2)), ctx)
    assert seen == [8]
    assert reply.content["info"]["profile"] == "Small"
    b = [v for k, v in reply.content["arrays"].items() if "lora_B" in k]
    assert b and all(tuple(v.shape)[1] == 2 for v in b)  # rank tier 2 of the full rank 8
    assert wire.DEVICE_STATE not in ctx.state


def test_the_simulator_skips_an_offline_device(hetero_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _server(hetero_cfg, tmp_path)
    reply = simulation_app()(_message(setup, strategy, 1, _plan(8, 2, {"0": "offline this round"})), _ctx(0))
    status = reply.content["status"]
    assert status["hetero-skip"] and status["refused"] and status["reason"] == "offline this round"
    assert "arrays" not in reply.content and not (tmp_path / "ledger" / "client-0.json").exists()


@pytest.mark.parametrize("node", ["simulated", "deployed"])
def test_the_deployed_app_refuses_a_device_plan(tiny_cfg, tmp_path: Path, flwr_identity, node: str) -> None:  # type: ignore[no-untyped-def]
    """Without the simulator's mods a node does not train as a device the server chose: it
    refuses, before reading its data or spending anything."""
    setup, strategy = _server(tiny_cfg, tmp_path)
    ctx = _ctx(0) if node == "simulated" else _ctx(**{"data-path": str(tmp_path / "absent.csv"), "client-id": "n1",
                                                      "ledger-dir": str(tmp_path / "node-ledger")})
    reply = deployed_app(_message(setup, strategy, 1, _plan(8, 2)), ctx)
    status = reply.content["status"]
    assert status["refused"] and "hetero-plan" in str(status["reason"]) and "arrays" not in reply.content
    assert not (tmp_path / "ledger").exists() and not (tmp_path / "node-ledger").exists()
