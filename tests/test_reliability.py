"""Reliability: checkpoints (atomic, refused on a changed configuration), seeded client
faults, the minimum-replies policy and replay-aware privacy ledgers."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpeft.adapters import get
from fedpeft.cli.main import build_parser, resume_config
from fedpeft.client.app import handle_train
from fedpeft.config import ConfigError, config_hash, config_to_toml
from fedpeft.load import parse_config
from fedpeft.privacy.ledger import Ledger
from fedpeft.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpeft.server.loop import ServerSetup
from fedpeft.server.run_dir import RunDir
from fedpeft.sim.faults import InjectedCrash, draw_fault
from fedpeft.sim.mods import simulation_app
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.state import sampler_to_json


def _ckpt(server_round: int = 2, value: float = 1.0) -> Checkpoint:
    rng = random.Random(5)
    rng.random()
    base = {"previous": {"mask": np.ones(4, np.float32)}, "sampler": sampler_to_json(rng.getstate())}
    return Checkpoint(
        server_round, "abc", {"b": np.full((2, 3), value, np.float32)}, [["AdapterAvg", base]], {},
        [{"round": 1, "epsilon": float("inf"), "loss": float("nan")}], {"0": 1.5}, ["prv"],
    )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, _ckpt())
    got = load_checkpoint(path)
    assert got.server_round == 2 and got.config_hash == "abc" and got.accountants == ["prv"]
    np.testing.assert_array_equal(got.state["b"], np.ones((2, 3), np.float32))
    assert got.state["b"].dtype == np.float32 and set(got.previous) == {"mask"}
    rng = random.Random()
    rng.setstate(got.rng_state)
    expect = random.Random(5)
    expect.random()
    assert rng.random() == expect.random()
    assert got.rows[0]["epsilon"] == float("inf") and np.isnan(got.rows[0]["loss"]) and got.epsilon == {"0": 1.5}


def test_crash_during_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, _ckpt(1, 1.0))

    def dying_savez(fh, **arrays):  # type: ignore[no-untyped-def]
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _ckpt(2, 9.0))
    monkeypatch.undo()
    got = load_checkpoint(path)
    assert got.server_round == 1 and float(got.state["b"][0, 0]) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable fedpeft checkpoint"):
        load_checkpoint(path)


def _run_dir_with_checkpoint(tmp_path: Path, server_round: int = 1) -> tuple[Path, object]:
    cfg = parse_config({"train.rounds": 3, "output_dir": str(tmp_path / "run")})
    rd = RunDir(tmp_path / "run")
    rd.write_config(cfg)
    save_checkpoint(rd.checkpoint_path, Checkpoint(server_round, config_hash(cfg), {"b": np.zeros(2, np.float32)}))
    return rd.path, cfg


def _resume_args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["simulate", *argv])


def test_resume_takes_the_runs_own_configuration(tmp_path: Path) -> None:
    run, cfg = _run_dir_with_checkpoint(tmp_path)
    got = resume_config(_resume_args("--resume", str(run)))
    assert config_hash(got) == config_hash(cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("--lr", "0.5"), "train.lr"),
        (("--rounds", "5"), "train.rounds"),
        (("--epsilon", "inf"), "privacy.epsilon"),
    ],
)
def test_resume_with_a_different_configuration_is_refused(tmp_path: Path, argv: tuple[str, ...], reason: str) -> None:
    run, _ = _run_dir_with_checkpoint(tmp_path)
    with pytest.raises(ConfigError) as info:
        resume_config(_resume_args("--resume", str(run), *argv))
    assert "differs" in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)


def test_resume_refuses_missing_or_finished_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fedpeft run directory"):
        resume_config(_resume_args("--resume", str(tmp_path / "nothing")))
    run, _ = _run_dir_with_checkpoint(tmp_path, server_round=3)
    with pytest.raises(ConfigError, match="complete"):
        resume_config(_resume_args("--resume", str(run)))
    (run / "checkpoint.npz").unlink()
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_config(_resume_args("--resume", str(run)))


def test_fault_draws_are_seeded_and_at_the_requested_rate() -> None:
    draws = [draw_fault(0.3, 7, r, 0, str(c)) for r in range(1, 201) for c in range(20)]
    assert draws == [draw_fault(0.3, 7, r, 0, str(c)) for r in range(1, 201) for c in range(20)]
    rate = sum(d != "" for d in draws) / len(draws)
    assert abs(rate - 0.3) < 0.03
    assert {"crash", "timeout"} <= set(draws)
    assert all(draw_fault(0.0, 7, r, 0, "1") == "" for r in range(100))
    # a retry (attempt 1) draws afresh
    assert draws[:100] != [draw_fault(0.3, 7, r, 1, str(c)) for r in range(1, 201) for c in range(20)][:100]


def test_ledger_counts_a_replay_once_and_anything_else_again() -> None:
    led = Ledger("0", 6.0, 1e-5, "pld", noise_multiplier=1.0, sample_rate=0.1, planned_steps=30)
    ran = {"noise_multiplier": 1.0, "sample_rate": 0.1}  # what the round's optimizer and loader used
    e1 = led.record(1, 10, "key1", "out1", **ran)
    assert led.record(1, 10, "key1", "out1", **ran) == e1 and len(led.entries) == 1  # identical re-release
    e2 = led.record(1, 10, "key1", "out-different", **ran)  # same inputs, other bits: new spending
    assert e2 > e1 and len(led.entries) == 2
    assert led.record(1, 10, "key2", "out1", **ran) > e2  # other inputs: new spending
    with pytest.raises(ValueError, match="already"):
        led.record(1, 10, **ran)  # no key: a round is never recorded twice


def _client_setup(cfg, tmp_path: Path):  # type: ignore[no-untyped-def]
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(tmp_path / "ledger")})
    return setup, strategy


def _train_msg(setup, strategy, server_round: int) -> Message:  # type: ignore[no-untyped-def]
    content = RecordDict({"arrays": state_to_arrayrecord(setup.state), "config": strategy.round_config(server_round)})
    return Message(content=content, dst_node_id=7, message_type="train")


def _ctx(pid: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def test_rerun_round_is_bit_identical_and_not_charged_twice(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _client_setup(tiny_cfg, tmp_path)
    first = handle_train(_train_msg(setup, strategy, 1), _ctx(0))
    # the server crashed; a fresh client process re-runs round 1 from the same global state
    again = handle_train(_train_msg(setup, strategy, 1), _ctx(0))
    for name in setup.spec.tensors:
        np.testing.assert_array_equal(first.content["arrays"][name].numpy(), again.content["arrays"][name].numpy())
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    ledger = Ledger.from_json((tmp_path / "ledger" / "client-0.json").read_text())
    assert len(ledger.entries) == 1


def test_injected_faults_crash_or_lose_the_reply(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(tiny_cfg, faults=dataclasses.replace(tiny_cfg.faults, fail_rate=0.9))
    setup, strategy = _client_setup(cfg, tmp_path)
    # the first round in which the seeded draws give one crash and one timeout among the 3 clients
    rnd, kinds = next((r, k) for r in range(1, 100)
                      if {"crash", "timeout"} <= set(k := [draw_fault(0.9, cfg.seed, r, 0, str(p)) for p in range(3)]))
    crash, timeout = kinds.index("crash"), kinds.index("timeout")
    simulated_client = simulation_app()  # fault injection is a simulation-only ClientApp mod (fedpeft.sim.mods)
    with pytest.raises(InjectedCrash, match="injected crash"):
        simulated_client(_train_msg(setup, strategy, rnd), _ctx(crash))
    assert not (tmp_path / "ledger" / f"client-{crash}.json").exists()  # crashed before spending anything
    reply = simulated_client(_train_msg(setup, strategy, rnd), _ctx(timeout))
    assert reply.content["status"]["timed-out"] and not any(isinstance(v, ArrayRecord) for v in reply.content.values())
    assert (tmp_path / "ledger" / f"client-{timeout}.json").is_file()  # it trained: the spend is recorded


def test_too_few_valid_replies_average_nothing(caplog: pytest.LogCaptureFixture, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.strategies.validation import StateSpec
    from tests.test_validation import _content, _state

    spec = StateSpec({"w": ((2, 3), "float32"), "b": ((3,), "float32")}, frozen_hash="abc123")
    cfg = parse_config({"privacy.epsilon": "inf", "faults.min_clients": 2})
    strategy = AdapterAvg.from_config(get("ffa_lora"), cfg, spec, "", "h")
    sent = Message(content=RecordDict({"arrays": state_to_arrayrecord(_state())}), dst_node_id=1, message_type="train")
    lost = RecordDict({"status": ConfigRecord({"timed-out": True, "client": "b", "reason": "injected timeout"})})
    replies = [Message(content=_content(client="a"), reply_to=sent), Message(content=lost, reply_to=sent)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and not strategy.report.released
    assert strategy.report.failed == {"b": "injected timeout"}
    assert any("nothing averaged in" in r.message for r in caplog.records)
