"""The ClientApp's round handler: what it sends, what it refuses, what it remembers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpeft.client.app import handle_train
from fedpeft.config import config_hash, config_to_toml
from fedpeft.server.loop import ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import validate_reply


def _setup(cfg, tmp_path: Path):  # type: ignore[no-untyped-def]
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(tmp_path / "ledger")})
    return setup, strategy


def _message(setup, strategy, server_round: int, frozen: str | None = None) -> Message:  # type: ignore[no-untyped-def]
    conf = strategy.round_config(server_round)
    if frozen is not None:
        conf["frozen-hash"] = frozen
    content = RecordDict({"arrays": state_to_arrayrecord(setup.state), "config": conf})
    return Message(content=content, dst_node_id=7, message_type="train")


def _context(pid: int = 0) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def test_reply_carries_exactly_b_and_head_and_validates(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _setup(tiny_cfg, tmp_path)
    reply = handle_train(_message(setup, strategy, 1), _context())
    arrays = [v for v in reply.content.values() if isinstance(v, ArrayRecord)]
    assert len(arrays) == 1
    assert not any("lora_A" in k for k in arrays[0])
    assert set(arrays[0].keys()) == set(setup.spec.tensors)
    rep = validate_reply(reply.content, setup.spec)
    assert rep.weight == tiny_cfg.data.examples_per_client
    assert 0 < rep.metrics["epsilon"] <= tiny_cfg.privacy.epsilon
    assert rep.metrics["bytes-up"] == setup.spec.nbytes
    assert (tmp_path / "ledger" / "client-0.json").is_file()


def test_frozen_hash_mismatch_is_an_error(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _setup(tiny_cfg, tmp_path)
    with pytest.raises(RuntimeError, match="hash mismatch"):
        handle_train(_message(setup, strategy, 1, frozen="0" * 64), _context())


def test_budget_is_enforced_across_restarts(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, rounds=2))
    setup, strategy = _setup(cfg, tmp_path)
    ctx = _context(1)
    r1 = handle_train(_message(setup, strategy, 1), ctx)
    eps1 = r1.content["metrics"]["epsilon"]
    # A restarted client process: empty Context.state, ledger only on disk.
    r2 = handle_train(_message(setup, strategy, 2), _context(1))
    eps2 = r2.content["metrics"]["epsilon"]
    assert eps2 > eps1 and eps2 <= cfg.privacy.epsilon
    # A third round (beyond the planned two) would exceed the budget: refused, nothing sent.
    r3 = handle_train(_message(setup, strategy, 3), ctx)
    status = r3.content["status"]
    assert isinstance(status, ConfigRecord) and status["refused"]
    assert "budget" in str(status["reason"]) and "example-level" in str(status["reason"])
    assert not any(isinstance(v, ArrayRecord) for v in r3.content.values())
