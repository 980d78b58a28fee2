"""The ClientApp's round handler, step by step (``fedpeft.client.app``), without training a model.

Each test calls one of app.py's steps directly, on real Flower messages and contexts and the
tiny BERT's cached runtime, with the trainer's entry point (``train_local``) replaced by a
recorder that returns a fixed :class:`LocalResult` (and moves every trainable tensor by +1, so
that a reply shows the state *after* training). The accountant's PLD primitive is replaced by
``epsilon = sum(steps * q / sigma)`` (:func:`cheap_accountant`): monotone like the real one,
exact to check by hand, and milliseconds instead of seconds per evaluation. What is pinned:
the refusals' texts (they reach the server and must carry no data), the reply's exact metrics
and arrays (B and the head only: nothing leaves the client that the accountant does not
cover), the ledger's entry after a round, the replay rule and the budget checks before any
spending. tests/test_client_app.py runs the same handler end to end with real training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import fedpeft.client.app as app
import fedpeft.privacy.accounting as accounting
import fedpeft.wire as wire
from fedpeft.adapters.capabilities import PersonalEvalParams
from fedpeft.client.node_store import (
    LEDGER_STATE_KEY,
    StoredRelease,
    data_digest,
    digest,
    load_local,
    load_release,
    node_secret,
    save_ledger,
    save_local,
    save_release,
    secret_path,
)
from fedpeft.client.personal_eval import release_digest, split_held_out
from fedpeft.client.runtime import ClientIdentity, NodeRefusal, Runtime, runtime_for
from fedpeft.client.trainer import LocalResult
from fedpeft.config import RunConfig, config_hash, config_to_toml
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.randomness import RoundRandomness
from fedpeft.privacy.releases import release_entry

Q = 1 / 3  # 96 examples in batches of 32
B_AND_HEAD = {f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_B.default.weight"
              for i in (0, 1) for m in ("query", "value")} | {
    "base_model.model.classifier.modules_to_save.default.weight",
    "base_model.model.classifier.modules_to_save.default.bias"}
NBYTES = (4 * 32 * 8 + 2 * 32 + 2) * 4  # four B (32 x 8) and the head (2 x 32 + 2), float32
RESULT = LocalResult(steps=2, examples=96, samples_seen=64, loss_first=0.75, loss_mean=0.625, loss_last=0.5,
                     seconds=1.25, sample_rate=Q)


def _fake_pld(history: Any, delta: float, relation: str = "replace-one") -> float:
    return float(sum(n * q / s for s, q, n in history))


@pytest.fixture(autouse=True)
def cheap_accountant(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """epsilon = sum(steps * q / sigma) in place of PLD (module doc); the per-process caches are
    cleared before and after so no other test sees these figures."""
    accounting._epsilon_of.cache_clear()
    accounting.calibrate_noise.cache_clear()
    monkeypatch.setattr(accounting, "pld_epsilon", _fake_pld)
    yield
    accounting._epsilon_of.cache_clear()
    accounting.calibrate_noise.cache_clear()


class Trainer:
    """Stands in for ``train_local``: records each call, moves the trainable tensors by +1."""

    def __init__(self, result: LocalResult = RESULT) -> None:
        self.calls: list[dict[str, Any]] = []
        self.result = result

    def __call__(self, model, plugin, tokenizer, data, cfg, steps, device, sigma, rng, *, desc, encoded):  # type: ignore[no-untyped-def]
        self.calls.append({"model": model, "plugin": plugin, "tokenizer": tokenizer, "data": data, "cfg": cfg,
                           "steps": steps, "device": device, "sigma": sigma, "rng": rng, "desc": desc,
                           "encoded": encoded})
        with torch.no_grad():
            for p in plugin.trainable_state(model).values():
                p.add_(1.0)
        return self.result


@pytest.fixture()
def trainer(monkeypatch: pytest.MonkeyPatch) -> Trainer:
    fake = Trainer()
    monkeypatch.setattr(app, "train_local", fake)
    return fake


def _rt(cfg: RunConfig) -> Runtime:
    return runtime_for(config_to_toml(cfg), config_hash(cfg))


def _incoming(rt: Runtime, value: float = 0.5) -> dict[str, np.ndarray]:
    return {k: np.full(tuple(v.shape), value, dtype=np.float32) for k, v in rt.plugin.trainable_state(rt.model).items()}


def _conf(cfg: RunConfig, server_round: int, ledger_dir: Path, frozen: str | None = None, **extra: Any) -> ConfigRecord:
    rt = _rt(cfg)
    frozen = rt.plugin.frozen_fingerprint(rt.model) if frozen is None else frozen
    return wire.RoundConfig(server_round, config_to_toml(cfg), config_hash(cfg), frozen).to_record(
        {wire.LEDGER_DIR: str(ledger_dir), **extra})


def _msg(cfg: RunConfig, server_round: int, ledger_dir: Path, state: dict[str, np.ndarray] | None = None,
         frozen: str | None = None, **extra: Any) -> Message:
    conf = _conf(cfg, server_round, ledger_dir, frozen, **extra)
    arrays = wire.state_to_arrayrecord(_incoming(_rt(cfg)) if state is None else state)
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: conf}), dst_node_id=7, message_type="train")


def _ctx(**node: Any) -> Context:
    return Context(run_id=1, node_id=7, node_config=node or {"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _planned(cfg: RunConfig, ledger_dir: Path, ctx: Context, sigma: float = 2.0, planned_steps: int = 4) -> Ledger:
    """Client 0's ledger with a plan (sigma, q = 1/3) that the round's check keeps: no calibration."""
    ledger = Ledger(client="0", target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, noise_multiplier=sigma,
                    sample_rate=Q, planned_steps=planned_steps)
    save_ledger(ledger, ledger_dir, "0", ctx)
    return ledger


def _request(msg: Message, ctx: Context) -> app.RoundRequest:
    req = app._parse(msg, ctx)
    assert isinstance(req, app.RoundRequest)
    return req


def _status(reply: Message) -> dict[str, Any]:
    assert set(reply.content.keys()) == {wire.STATUS}  # no arrays, no metrics
    return dict(reply.content[wire.STATUS])


@pytest.fixture()
def nodp_cfg(tiny_cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy, epsilon=float("inf")))


# ---- _identity ----------------------------------------------------------------------------
DEPLOYED_NO_LEDGER = (r"^this deployed node has no ledger-dir in its node config; a node keeps its own ledger "
                      r"and secret on its own disk \(set ledger-dir=\.\.\.\)$")


@pytest.mark.parametrize("ledger", [None, "", "   "])
def test_a_deployed_node_without_its_own_ledger_dir_is_refused(tmp_path: Path, ledger: str | None) -> None:
    node: dict[str, Any] = {wire.DATA_PATH: str(tmp_path / "d.csv")}
    if ledger is not None:
        node[wire.LEDGER_DIR] = ledger
    conf = ConfigRecord({wire.LEDGER_DIR: str(tmp_path / "server-said")})  # the server's word is not enough
    with pytest.raises(NodeRefusal, match=DEPLOYED_NO_LEDGER):
        app._identity(conf, _ctx(**node))


def test_identity_of_a_deployed_and_of_a_simulated_client(tmp_path: Path) -> None:
    conf = ConfigRecord({wire.LEDGER_DIR: str(tmp_path / "run-ledger"), wire.LABEL_NAMES: '["neg", "pos"]'})
    deployed = app._identity(conf, _ctx(**{wire.DATA_PATH: "d.csv", wire.LEDGER_DIR: str(tmp_path / "own"),
                                           wire.CLIENT_ID: "n1"}))
    assert deployed == ClientIdentity("n1", None, "d.csv", tmp_path / "own", ("neg", "pos"))
    simulated = app._identity(conf, _ctx(**{wire.PARTITION_ID: 2, wire.DATA_PATH: ""}))
    assert simulated == ClientIdentity("2", 2, "", tmp_path / "run-ledger", ("neg", "pos"))


# ---- _directive_refusal -------------------------------------------------------------------
def _plan_entry() -> str:
    return wire.encode_hetero_plan(["Small"], [0, 0, 0], {"Small": (8, 2)}, {})


def _refusal_text(client: str) -> str:
    return (f"client {client}: the round carries the simulation directive 'hetero-plan'; this node does not "
            f"emulate devices (only `fedpeft simulate`'s ClientApp follows it): refusing to train")


def test_a_round_without_a_directive_or_with_an_empty_one_is_not_refused(tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    ident = ClientIdentity("0", 0, "", tmp_path)
    msg = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    assert app._directive_refusal(msg, ConfigRecord({}), ident, _ctx()) is None
    assert app._directive_refusal(msg, ConfigRecord({wire.HETERO_PLAN: ""}), ident, _ctx()) is None


def test_only_a_simulated_client_handed_its_device_follows_a_directive(tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    msg = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    conf = ConfigRecord({wire.HETERO_PLAN: _plan_entry()})
    handed = _ctx()
    wire.DeviceDirective("Small", 8, 2).store(handed.state)
    assert app._directive_refusal(msg, conf, ClientIdentity("0", 0, "", tmp_path), handed) is None
    with caplog.at_level(logging.WARNING, logger="fedpeft.client"):
        for ident, ctx in ((ClientIdentity("0", 0, "", tmp_path), _ctx()),  # simulated, nothing handed over
                           (ClientIdentity("n1", None, "d.csv", tmp_path), handed)):  # deployed: never
            reply = app._directive_refusal(msg, conf, ident, ctx)
            assert reply is not None
            assert _status(reply) == {wire.REFUSED: True, wire.CLIENT: ident.client_id,
                                      wire.REASON: _refusal_text(ident.client_id)}
    assert [r.getMessage() for r in caplog.records] == [_refusal_text("0"), _refusal_text("n1")]


# ---- _parse -------------------------------------------------------------------------------
def test_parse_verifies_and_returns_the_request(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt = _rt(tiny_cfg)
    msg, ctx = _msg(tiny_cfg, 2, tmp_path / "ledger"), _ctx()
    req = _request(msg, ctx)
    assert req.msg is msg and req.context is ctx and req.rt is rt and req.cfg is rt.cfg
    assert req.ident == ClientIdentity("0", 0, "", tmp_path / "ledger")
    assert req.round == wire.RoundConfig.from_record(msg.content[wire.CONFIG])
    assert req.data is rt.data_for(req.ident, {}) and len(req.data) == 96
    assert req.device is None and req.personal is None and req.held is None and not req.evaluates


@pytest.mark.parametrize("server_round", [0, 3, -1])
def test_a_round_outside_the_plan_is_refused(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                             server_round: int) -> None:
    reply = app._parse(_msg(tiny_cfg, server_round, tmp_path / "ledger"), _ctx())
    assert isinstance(reply, Message)
    assert _status(reply) == {wire.REFUSED: True, wire.CLIENT: "0", wire.REASON: (
        f"client 0: round {server_round} is outside the run's rounds 1..2: no privacy budget was planned for it "
        f"(example-level, replace-one, delta=1e-05)")}
    assert not (tmp_path / "ledger").exists()


@pytest.mark.parametrize("server_round", [1, 2])
def test_the_plans_first_and_last_rounds_are_accepted(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                      server_round: int) -> None:
    assert _request(_msg(tiny_cfg, server_round, tmp_path), _ctx()).round.server_round == server_round


def test_parse_refuses_a_directive_before_looking_at_the_round(tiny_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              flwr_identity) -> None:
    reply = app._parse(_msg(tiny_cfg, 9, tmp_path, **{wire.HETERO_PLAN: _plan_entry()}), _ctx())
    assert isinstance(reply, Message) and _status(reply)[wire.REASON] == _refusal_text("0")


def test_parse_raises_on_a_bad_identity_or_hash(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NodeRefusal, match=DEPLOYED_NO_LEDGER):
        app._parse(_msg(tiny_cfg, 1, tmp_path), _ctx(**{wire.DATA_PATH: "d.csv"}))
    msg = _msg(tiny_cfg, 1, tmp_path)
    msg.content.config_records[wire.CONFIG][wire.CONFIG_HASH] = "0" * 16
    with pytest.raises(NodeRefusal, match="does not match its hash"):
        app._parse(msg, _ctx())


def test_unusable_local_data_is_refused_without_its_details(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                           caplog: pytest.LogCaptureFixture) -> None:
    node = {wire.DATA_PATH: str(tmp_path / "secret-name.csv"), wire.CLIENT_ID: "n1",
            wire.LEDGER_DIR: str(tmp_path / "own")}
    with caplog.at_level(logging.ERROR, logger="fedpeft.client"):
        reply = app._parse(_msg(tiny_cfg, 1, tmp_path), _ctx(**node))
    assert isinstance(reply, Message)
    assert _status(reply) == {wire.REFUSED: True, wire.CLIENT: "n1",
                              wire.REASON: "local data could not be used; details are in the node's log"}
    assert [(r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
        ("client n1: could not use its local data", True)]


def test_a_handed_device_sets_the_physical_batch_only(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt, ctx = _rt(tiny_cfg), _ctx()
    wire.DeviceDirective("Small", 8, 2).store(ctx.state)
    req = _request(_msg(tiny_cfg, 1, tmp_path, **{wire.HETERO_PLAN: _plan_entry()}), ctx)
    assert req.device == wire.DeviceDirective("Small", 8, 2)
    assert req.cfg == dataclasses.replace(rt.cfg, train=dataclasses.replace(rt.cfg.train, physical_batch_size=8))
    assert rt.cfg.train.physical_batch_size != 8


# ---- RoundRequest.evaluates ---------------------------------------------------------------
@pytest.mark.parametrize(("personal", "server_round", "evaluates"), [
    (PersonalEvalParams(0.25, 2.0), 2, True), (PersonalEvalParams(0.25, 2.0), 1, False), (None, 2, False)])
def test_only_the_last_round_of_a_personal_evaluation_evaluates(tiny_cfg: RunConfig, personal: Any,  # type: ignore[no-untyped-def]
                                                                server_round: int, evaluates: bool) -> None:
    req = app.RoundRequest(None, None, None, tiny_cfg, None, wire.RoundConfig(server_round, "", ""),  # type: ignore[arg-type]
                           None, None, personal)  # type: ignore[arg-type]
    assert req.evaluates is evaluates


# ---- _inputs ------------------------------------------------------------------------------
def test_a_frozen_tensor_mismatch_is_an_error(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt = _rt(tiny_cfg)
    local = rt.plugin.frozen_fingerprint(rt.model)
    req = _request(_msg(tiny_cfg, 1, tmp_path, frozen="ab" * 32), _ctx())
    with pytest.raises(NodeRefusal, match=(
            rf"^client 0: frozen-tensor hash mismatch \(local {local[:12]} != server abababababab\); "
            r"the adapter seed or code differs from the server's$")):
        app._inputs(req)


def test_inputs_and_the_replay_key(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rt = _rt(tiny_cfg)
    req = _request(_msg(tiny_cfg, 1, tmp_path), _ctx())
    activated: list[tuple[Any, Any]] = []
    monkeypatch.setattr(rt, "activate", lambda model, ident: activated.append((model, ident)))
    inputs = app._inputs(req)
    assert activated == [(rt.model, req.ident)]  # a multi-task model is routed to this client's task
    assert {k: v.tolist() for k, v in inputs.incoming.items()} == {k: v.tolist() for k, v in _incoming(rt).items()}
    assert inputs.local_in == {} and inputs.steps == 2
    frozen = rt.plugin.frozen_fingerprint(rt.model)
    assert inputs.info == {wire.CLIENT: "0", wire.FROZEN_HASH: frozen}
    # The key's form is what stored releases are found by: pinned as it is written.
    assert inputs.replay_key == digest(config_hash(tiny_cfg), "1|0|2", "{}", _incoming(rt), {}, data_digest(req.data))
    keys = {inputs.replay_key}
    for other in (_request(_msg(tiny_cfg, 2, tmp_path), _ctx()),
                  _request(_msg(tiny_cfg, 1, tmp_path, _incoming(rt, 0.25)), _ctx()),
                  dataclasses.replace(req, ident=dataclasses.replace(req.ident, client_id="1")),
                  dataclasses.replace(req, data=req.data.subset(np.arange(95))),
                  dataclasses.replace(req, held=req.data.subset(np.arange(3)))):
        keys.add(app._inputs(other).replay_key)
    assert len(keys) == 6


def test_a_devices_directive_enters_the_key_and_the_info(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt, ctx = _rt(tiny_cfg), _ctx()
    device = wire.DeviceDirective("Small", 8, 2)
    device.store(ctx.state)
    req = _request(_msg(tiny_cfg, 1, tmp_path, **{wire.HETERO_PLAN: _plan_entry()}), ctx)
    held = req.data.subset(np.arange(3))
    inputs = app._inputs(dataclasses.replace(req, held=held))
    assert inputs.info == {wire.CLIENT: "0", wire.FROZEN_HASH: rt.plugin.frozen_fingerprint(rt.model),
                           wire.PROFILE: "Small"}
    assert inputs.replay_key == digest(config_hash(tiny_cfg), "1|0|2", device.replay_part(), _incoming(rt), {},
                                       data_digest(req.data), data_digest(held))


# ---- _local_before / _keep_local ----------------------------------------------------------
def _local_req(tiny_cfg: RunConfig, tmp_path: Path, server_round: int) -> app.RoundRequest:
    return _request(_msg(tiny_cfg, server_round, tmp_path), _ctx())


def test_local_state_comes_from_context_state_only_when_kept_before_this_round(tiny_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                              flwr_identity) -> None:
    req = _local_req(tiny_cfg, tmp_path, 2)
    h = config_hash(tiny_cfg)
    assert app._local_before(req) == {}  # first round: nothing anywhere
    save_local(tmp_path, "0", h, 1, {"b": np.array([1.0])})
    save_local(tmp_path, "0", h, 2, {"b": np.array([2.0])})  # this round's own (a retry): not used
    assert app._local_before(req)["b"].tolist() == [1.0]  # from disk, latest before round 2
    state = req.context.state
    state[app.LOCAL_STATE_KEY] = wire.state_to_arrayrecord({"b": np.array([7.0])})
    for kept, source in ((1, [7.0]), (2, [1.0]), (3, [1.0])):
        state[app.LOCAL_ROUND_KEY] = ConfigRecord({"round": kept})
        assert app._local_before(req)["b"].tolist() == source, kept
    state[app.LOCAL_ROUND_KEY] = ConfigRecord({"other": 1})
    assert app._local_before(req)["b"].tolist() == [1.0]
    del state[app.LOCAL_ROUND_KEY]
    assert app._local_before(req)["b"].tolist() == [1.0]
    state[app.LOCAL_ROUND_KEY] = ConfigRecord({"round": 1})
    state[app.LOCAL_STATE_KEY] = ConfigRecord({"b": 7.0})  # not an ArrayRecord
    assert app._local_before(req)["b"].tolist() == [1.0]


def test_keep_local_keeps_it_in_context_state_and_on_disk(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    req = _local_req(tiny_cfg, tmp_path, 2)
    app._keep_local(req, {"b": np.array([3.0, 4.0])})
    state = req.context.state
    assert wire.arrayrecord_to_state(state[app.LOCAL_STATE_KEY])["b"].tolist() == [3.0, 4.0]
    assert dict(state[app.LOCAL_ROUND_KEY]) == {"round": 2}
    r, local = load_local(tmp_path, "0", config_hash(tiny_cfg), 3)
    assert r == 2 and local["b"].tolist() == [3.0, 4.0]
    fresh = dataclasses.replace(req, round=dataclasses.replace(req.round, server_round=3), context=_ctx())
    assert app._local_before(fresh)["b"].tolist() == [3.0, 4.0]  # a restarted process reads its disk


# ---- _replayed ----------------------------------------------------------------------------
def test_a_round_is_replayed_only_when_stored_and_recorded(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                           caplog: pytest.LogCaptureFixture) -> None:
    req = _local_req(tiny_cfg, tmp_path, 1)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, req.context)
    assert app._replayed(req, inputs, ledger) is None  # neither
    state, metrics = {"w": np.array([1.5], dtype=np.float32)}, {wire.NUM_EXAMPLES: 96, wire.EPSILON: 0.5}
    save_release(tmp_path, "0", StoredRelease(1, inputs.replay_key, "out", state, {"b": np.array([9.0])}, metrics))
    assert app._replayed(req, inputs, ledger) is None  # stored, never recorded: not a release of this ledger
    assert app.LOCAL_STATE_KEY not in req.context.state
    ledger.record(1, 2, inputs.replay_key, "out", noise_multiplier=2.0, sample_rate=Q)
    other = dataclasses.replace(inputs, replay_key="f" * 64)
    assert app._replayed(req, other, ledger) is None  # other inputs
    with caplog.at_level(logging.INFO, logger="fedpeft.client"):
        reply = app._replayed(req, inputs, ledger)
    assert [r.getMessage() for r in caplog.records] == [
        "client 0: round 1 was already released from these inputs; re-sending the stored release (no new privacy cost)"]
    assert reply is not None
    assert wire.arrayrecord_to_state(reply.content[wire.ARRAYS])["w"].tolist() == [1.5]
    assert dict(reply.content[wire.METRICS]) == metrics
    assert dict(reply.content[wire.INFO]) == {**inputs.info, wire.ACCOUNTANT: "pld"}
    assert wire.arrayrecord_to_state(req.context.state[app.LOCAL_STATE_KEY])["b"].tolist() == [9.0]
    assert dict(req.context.state[app.LOCAL_ROUND_KEY]) == {"round": 1}


def test_a_replay_without_local_state_keeps_none(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    req = _local_req(tiny_cfg, tmp_path, 1)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, req.context)
    save_release(tmp_path, "0", StoredRelease(1, inputs.replay_key, "out", {"w": np.zeros(1)}, {}, {}))
    ledger.record(1, 2, inputs.replay_key, "out", noise_multiplier=2.0, sample_rate=Q)
    assert app._replayed(req, inputs, ledger) is not None
    assert app.LOCAL_STATE_KEY not in req.context.state and app.LOCAL_ROUND_KEY not in req.context.state


# ---- _plan_budget -------------------------------------------------------------------------
@pytest.fixture()
def plan_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = Ledger.ensure_plan

    def spy(self: Ledger, **kwargs: Any) -> str:
        calls.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(Ledger, "ensure_plan", spy)
    return calls


@pytest.mark.parametrize(("server_round", "planned"), [(1, 4), (2, 2)])
def test_the_plan_is_checked_on_a_trial_copy(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                             plan_calls: list[dict[str, Any]], server_round: int, planned: int,
                                             caplog: pytest.LogCaptureFixture) -> None:
    req = _local_req(tiny_cfg, tmp_path, server_round)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, req.context)
    before = ledger.to_json()
    with caplog.at_level(logging.DEBUG, logger="fedpeft.client"):
        trial = app._plan_budget(req, inputs, ledger)
    assert [r.getMessage() for r in caplog.records] == ["client 0: plan holds (sigma=2.0000, q=0.333333, 4 steps left)"]
    assert isinstance(trial, Ledger) and trial is not ledger and ledger.to_json() == before
    assert plan_calls == [{"target_epsilon": 6.0, "delta": 1e-5, "sample_rate": Q, "planned_steps": planned,
                           "accountant": "pld", "reserved": ()}]
    assert (trial.noise_multiplier, trial.sample_rate) == (2.0, Q)


def test_a_new_ledger_is_calibrated_on_the_trial_only(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    req = _local_req(tiny_cfg, tmp_path, 1)
    ledger = Ledger(client="0", target_epsilon=6.0, delta=1e-5)
    trial = app._plan_budget(req, app._inputs(req), ledger)
    assert isinstance(trial, Ledger)
    assert ledger.noise_multiplier == 0.0 and trial.noise_multiplier > 0 and trial.planned_steps == 4
    assert 4 * Q / trial.noise_multiplier <= 6.0


def _refused_plan(req: app.RoundRequest, ledger: Ledger) -> dict[str, Any]:
    before = ledger.to_json()
    reply = app._plan_budget(req, app._inputs(req), ledger)
    assert isinstance(reply, Message)
    assert ledger.to_json() == before
    return _status(reply)


def test_the_budget_is_refused_before_it_is_exceeded(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                     caplog: pytest.LogCaptureFixture) -> None:
    req = _local_req(tiny_cfg, tmp_path, 2)
    ledger = _planned(tiny_cfg, tmp_path, req.context)
    ledger.record(1, 87, "earlier", "h", noise_multiplier=5.0, sample_rate=Q)  # 87 / 3 / 5 = 5.8 spent
    ledger.plan_offset = 87
    with caplog.at_level(logging.WARNING, logger="fedpeft.client"):
        status = _refused_plan(req, ledger)
    assert [r.getMessage() for r in caplog.records] == [status[wire.REASON]]
    assert status[wire.EPSILON] == pytest.approx(5.8)
    assert str(status[wire.REASON]).startswith("client 0: next round (2 steps) would reach epsilon=6.133 > budget 6 ")
    assert (status[wire.REFUSED], status[wire.CLIENT]) == (True, "0")


def test_the_nodes_own_limits_are_refused_before_calibrating(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                             plan_calls: list[dict[str, Any]]) -> None:
    req = _local_req(tiny_cfg, tmp_path, 1)
    ledger = _planned(tiny_cfg, tmp_path, req.context)
    capped = dataclasses.replace(req, context=_ctx(**{wire.MAX_EPSILON: 8, wire.MAX_DELTA: 1e-6}))
    assert _refused_plan(capped, ledger) == {
        wire.REFUSED: True, wire.CLIENT: "0", wire.EPSILON: 0.0,
        wire.REASON: "the run's delta=1e-05 is above this node's max-delta=1e-06; refusing to train"}
    assert plan_calls == []
    capped = dataclasses.replace(req, context=_ctx(**{wire.MAX_EPSILON: 0.5}))  # the plan reaches 4 / 3 / 2
    reason = str(_refused_plan(capped, ledger)[wire.REASON])
    assert reason.startswith("client 0: the run's plan (rounds 1..2, 4 steps at sigma=2.0000) would reach "
                             "epsilon=0.667 > this node's cap max-epsilon=0.5")
    roomy = dataclasses.replace(req, context=_ctx(**{wire.MAX_EPSILON: 0.7}))
    assert isinstance(app._plan_budget(roomy, app._inputs(roomy), ledger), Ledger)


# ---- _metrics / _reply --------------------------------------------------------------------
DP_METRICS = {wire.NUM_EXAMPLES: 96, wire.STEPS: 2, wire.BYTES_UP: 123, wire.EPSILON: 0.25, wire.DELTA: 1e-5,
              wire.NOISE_MULTIPLIER: 2.0, wire.SAMPLE_RATE: Q}
DIAGNOSTICS = {wire.TRAIN_LOSS: 0.625, wire.TRAIN_LOSS_FIRST: 0.75, wire.TRAIN_LOSS_LAST: 0.5, wire.SAMPLES_SEEN: 64,
               wire.SECONDS: 1.25}


def test_dp_metrics_are_public_values_only(tiny_cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fedpeft.client"):
        assert app._metrics(tiny_cfg, RESULT, 0.25, 2.0, 123, "c3", 2) == DP_METRICS
    assert [r.getMessage() for r in caplog.records] == [f"client c3 round 2 (stays on this node): {DIAGNOSTICS}"]


def test_metrics_without_dp_carry_the_diagnostics(nodp_cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fedpeft.client"):
        metrics = app._metrics(nodp_cfg, RESULT, float("inf"), None, 123, "c3", 2)
    assert metrics == {wire.NUM_EXAMPLES: 96, wire.STEPS: 2, wire.BYTES_UP: 123, **DIAGNOSTICS,
                       wire.EPSILON: float("inf"), wire.NOISE_MULTIPLIER: 0.0}
    assert caplog.records == []


def test_a_dp_reply_refuses_unaccounted_metrics(tiny_cfg: RunConfig, nodp_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                flwr_identity) -> None:
    req = _local_req(tiny_cfg, tmp_path, 1)
    with pytest.raises(wire.ProtocolError, match="may not carry train-loss"):
        app._reply(req, {"w": np.zeros(2)}, {**DP_METRICS, wire.TRAIN_LOSS: 0.5}, {"client": "0"})
    with pytest.raises(wire.ProtocolError, match="personal-accuracy only as a release recorded"):
        app._reply(req, {"w": np.zeros(2)}, {**DP_METRICS, wire.PERSONAL_ACCURACY: 0.5}, {"client": "0"},
                   Ledger(client="0", target_epsilon=6.0, delta=1e-5))
    reply = app._reply(req, {"w": np.ones(2)}, DP_METRICS, {"client": "0"})
    assert dict(reply.content[wire.METRICS]) == DP_METRICS and dict(reply.content[wire.INFO]) == {"client": "0"}
    assert wire.arrayrecord_to_state(reply.content[wire.ARRAYS])["w"].tolist() == [1.0, 1.0]
    plain = dataclasses.replace(req, cfg=nodp_cfg)
    reply = app._reply(plain, {"w": np.ones(2)}, {**DP_METRICS, wire.TRAIN_LOSS: 0.5}, {})
    assert dict(reply.content[wire.METRICS])[wire.TRAIN_LOSS] == 0.5


# ---- _store_release -----------------------------------------------------------------------
def test_store_release_records_then_stores(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                           caplog: pytest.LogCaptureFixture) -> None:
    req = _local_req(tiny_cfg, tmp_path, 1)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, _ctx())
    state = {"w": np.full((2, 3), 1.5, dtype=np.float32)}
    result = dataclasses.replace(RESULT, steps=3, sample_rate=0.25)  # what really ran
    with caplog.at_level(logging.DEBUG, logger="fedpeft.client"):
        metrics = app._store_release(req, inputs, ledger, state, {"b": np.array([5.0])}, result, None)
    assert f"client 0 round 1 (stays on this node): {DIAGNOSTICS}" in [r.getMessage() for r in caplog.records]
    assert metrics == {**DP_METRICS, wire.STEPS: 3, wire.BYTES_UP: 24, wire.EPSILON: 3 * 0.25 / 2.0,
                       wire.SAMPLE_RATE: 0.25}
    [entry] = ledger.entries
    assert (entry.round, entry.steps, entry.noise_multiplier, entry.sample_rate) == (1, 3, 2.0, 0.25)
    assert (entry.replay_key, entry.output_hash) == (inputs.replay_key, digest(state))
    assert Ledger.from_json((tmp_path / "client-0.json").read_text()).entries == [entry]
    assert Ledger.from_json(str(req.context.state[LEDGER_STATE_KEY]["json"])).entries == [entry]
    stored = load_release(tmp_path, "0", 1, inputs.replay_key)
    assert stored is not None and stored.output_hash == digest(state) and stored.metrics == metrics
    assert stored.state["w"].tolist() == state["w"].tolist() and stored.local["b"].tolist() == [5.0]
    assert wire.arrayrecord_to_state(req.context.state[app.LOCAL_STATE_KEY])["b"].tolist() == [5.0]


def test_store_release_without_dp_stores_nothing_private(nodp_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    req = _local_req(nodp_cfg, tmp_path, 1)
    inputs = app._inputs(req)
    metrics = app._store_release(req, inputs, None, {"w": np.zeros(4, dtype=np.float32)}, {}, RESULT, None)
    assert metrics == {wire.NUM_EXAMPLES: 96, wire.STEPS: 2, wire.BYTES_UP: 16, **DIAGNOSTICS,
                       wire.EPSILON: float("inf"), wire.NOISE_MULTIPLIER: 0.0}
    assert list(tmp_path.iterdir()) == [] and app.LOCAL_STATE_KEY not in req.context.state
    assert LEDGER_STATE_KEY not in req.context.state


def test_a_personal_evaluation_is_recorded_as_a_release(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    req = _local_req(tiny_cfg, tmp_path, 2)
    held = req.data.subset(np.arange(24))
    req = dataclasses.replace(req, data=req.data.subset(np.arange(24, 96)), personal=PersonalEvalParams(0.25, 4.0),
                              held=held)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, _ctx())
    ledger.reserved = [list(release_entry(4.0))]
    metrics = app._store_release(req, inputs, ledger, {"w": np.zeros(1, dtype=np.float32)}, {}, RESULT, 0.625)
    # 2 steps at (2.0, 1/3) and the release (4.0, q = 1, 1 step)
    assert metrics == {**DP_METRICS, wire.BYTES_UP: 4, wire.EPSILON: pytest.approx(2 * Q / 2.0 + 1 / 4.0),
                       wire.PERSONAL_ACCURACY: 0.625, wire.PERSONAL_EXAMPLES: 24}
    release = ledger.entries[-1]
    assert (release.round, release.steps, release.noise_multiplier, release.sample_rate) == (2, 1, 4.0, 1.0)
    assert (release.replay_key, release.output_hash) == (f"personal-eval:{inputs.replay_key}", release_digest(0.625))
    assert ledger.reserved == []
    app._reply(req, {}, metrics, {}, ledger)  # accounted: sent
    early = dataclasses.replace(req, round=dataclasses.replace(req.round, server_round=1))
    metrics = app._store_release(early, inputs, ledger, {"w": np.zeros(1, dtype=np.float32)}, {}, RESULT, None)
    assert wire.PERSONAL_ACCURACY not in metrics and wire.PERSONAL_EXAMPLES not in metrics
    assert ledger.entries[-1].sample_rate == Q and len(ledger.entries) == 3


# ---- _train -------------------------------------------------------------------------------
def test_train_installs_the_inputs_and_reads_back_the_trained_state(tiny_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   flwr_identity, trainer: Trainer) -> None:
    rt = _rt(tiny_cfg)
    req = _local_req(tiny_cfg, tmp_path, 1)
    inputs = app._inputs(req)
    ledger = _planned(tiny_cfg, tmp_path, _ctx(), sigma=1.75)
    state, local, result, personal = app._train(req, inputs, ledger, 12345)
    assert result is RESULT and personal is None and local == {}
    assert set(state) == B_AND_HEAD
    assert all(v.tolist() == np.full(v.shape, 1.5).tolist() for v in state.values())  # 0.5 installed, +1 trained
    [call] = trainer.calls
    assert call["model"] is rt.model and call["plugin"] is rt.plugin and call["tokenizer"] is rt.tokenizer
    assert call["data"] is req.data and call["cfg"] is req.cfg and call["steps"] == 2 and call["device"] is rt.device
    assert call["sigma"] == 1.75 and call["rng"] == 12345 and call["desc"] == "client 0 round 1"
    assert call["encoded"] is rt.encoded(req.ident, req.data)
    app._train(req, inputs, None, 1)
    assert trainer.calls[-1]["sigma"] is None


def test_train_evaluates_the_personal_model_before_training(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                           trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = _rt(tiny_cfg)
    seen: list[tuple[Any, ...]] = []

    def accuracy(task_type, model, tokenizer, held, cfg, device, sigma):  # type: ignore[no-untyped-def]
        seen.append((task_type, model, tokenizer, held, cfg, device, sigma, len(trainer.calls)))
        return 0.5

    monkeypatch.setattr(app, "personal_accuracy", accuracy)
    base = _local_req(tiny_cfg, tmp_path, 2)
    held = base.data.subset(np.arange(8))
    req = dataclasses.replace(base, personal=PersonalEvalParams(0.25, 4.0), held=held)
    inputs = app._inputs(req)
    assert app._train(req, inputs, _planned(tiny_cfg, tmp_path, _ctx()), 1)[3] == 0.5
    assert seen == [(rt.task_type, rt.model, rt.tokenizer, held, req.cfg, rt.device, 4.0, 0)]
    assert app._train(req, inputs, None, 1)[3] == 0.5 and seen[-1][6] is None  # no DP: the exact value
    assert app._train(dataclasses.replace(req, held=None), inputs, None, 1)[3] is None
    early = dataclasses.replace(req, round=dataclasses.replace(req.round, server_round=1))
    assert app._train(early, inputs, None, 1)[3] is None and len(seen) == 2


# ---- handle_train: the whole round with the recorder in place of training -----------------
def test_a_dp_round_replies_b_and_head_and_exact_public_metrics(tiny_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                flwr_identity, trainer: Trainer) -> None:
    rt, ctx = _rt(tiny_cfg), _ctx()
    _planned(tiny_cfg, tmp_path, ctx)
    msg = _msg(tiny_cfg, 1, tmp_path)
    key = app._inputs(_request(msg, _ctx())).replay_key
    reply = app.handle_train(msg, ctx)
    assert set(reply.content.keys()) == {wire.ARRAYS, wire.METRICS, wire.INFO}
    arrays = wire.arrayrecord_to_state(reply.content[wire.ARRAYS])
    assert set(arrays) == B_AND_HEAD and all((v == 1.5).all() for v in arrays.values())
    eps = 2 * Q / 2.0
    assert dict(reply.content[wire.METRICS]) == {**DP_METRICS, wire.BYTES_UP: NBYTES, wire.EPSILON: eps}
    assert dict(reply.content[wire.INFO]) == {wire.CLIENT: "0", wire.FROZEN_HASH: rt.plugin.frozen_fingerprint(rt.model),
                                             wire.ACCOUNTANT: "pld"}
    [entry] = Ledger.from_json((tmp_path / "client-0.json").read_text()).entries
    assert (entry.round, entry.steps, entry.noise_multiplier, entry.sample_rate, entry.replay_key,
            entry.epsilon_after) == (1, 2, 2.0, Q, key, eps)
    [call] = trainer.calls
    secret = node_secret(tmp_path, "0", deployed=False)
    assert secret_path(tmp_path, "0", deployed=False).is_file()
    assert call["rng"] == RoundRandomness.derived(secret, key, repr(2.0), repr(Q)) and call["sigma"] == 2.0


def test_secure_mode_draws_fresh_keys(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity, trainer: Trainer) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy, secure_mode=True))
    ctx = _ctx()
    _planned(cfg, tmp_path, ctx)
    app.handle_train(_msg(cfg, 1, tmp_path), ctx)
    rng = trainer.calls[0]["rng"]
    assert isinstance(rng, RoundRandomness) and rng.fresh


def test_a_replayed_round_is_not_charged_twice_and_anything_else_is(tiny_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                    flwr_identity, trainer: Trainer) -> None:
    ctx = _ctx()
    _planned(tiny_cfg, tmp_path, ctx)
    msg = _msg(tiny_cfg, 1, tmp_path)
    first = app.handle_train(msg, ctx)
    for again in (app.handle_train(msg, ctx), app.handle_train(_msg(tiny_cfg, 1, tmp_path), _ctx())):  # restarted
        assert dict(again.content[wire.METRICS]) == dict(first.content[wire.METRICS])
        assert dict(again.content[wire.INFO]) == dict(first.content[wire.INFO])
        assert {k: v.tolist() for k, v in wire.arrayrecord_to_state(again.content[wire.ARRAYS]).items()} == {
            k: v.tolist() for k, v in wire.arrayrecord_to_state(first.content[wire.ARRAYS]).items()}
    assert len(trainer.calls) == 1
    assert len(Ledger.from_json((tmp_path / "client-0.json").read_text()).entries) == 1
    other = app.handle_train(_msg(tiny_cfg, 1, tmp_path, _incoming(_rt(tiny_cfg), 0.25)), ctx)  # other inputs
    assert len(trainer.calls) == 2
    entries = Ledger.from_json((tmp_path / "client-0.json").read_text()).entries
    assert len(entries) == 2 and entries[1].replay_key != entries[0].replay_key
    assert other.content[wire.METRICS][wire.EPSILON] == entries[1].epsilon_after > entries[0].epsilon_after


def test_a_refused_budget_trains_nothing_and_saves_nothing(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                          trainer: Trainer) -> None:
    ctx = _ctx(**{wire.PARTITION_ID: 0, wire.MAX_EPSILON: 0.5})
    _planned(tiny_cfg, tmp_path, ctx)
    before = (tmp_path / "client-0.json").read_text()
    reply = app.handle_train(_msg(tiny_cfg, 1, tmp_path), ctx)
    assert "max-epsilon=0.5" in str(_status(reply)[wire.REASON])
    assert trainer.calls == [] and (tmp_path / "client-0.json").read_text() == before
    assert not (tmp_path / "client-0.releases").exists()


def test_a_round_without_dp(nodp_cfg: RunConfig, tmp_path: Path, flwr_identity, trainer: Trainer,  # type: ignore[no-untyped-def]
                            caplog: pytest.LogCaptureFixture) -> None:
    msg = _msg(nodp_cfg, 1, tmp_path)
    key = app._inputs(_request(msg, _ctx())).replay_key
    reply = app.handle_train(msg, _ctx())
    assert dict(reply.content[wire.METRICS]) == {wire.NUM_EXAMPLES: 96, wire.STEPS: 2, wire.BYTES_UP: NBYTES,
                                                 **DIAGNOSTICS, wire.EPSILON: float("inf"),
                                                 wire.NOISE_MULTIPLIER: 0.0}
    assert dict(reply.content[wire.INFO])[wire.ACCOUNTANT] == "none"
    assert set(wire.arrayrecord_to_state(reply.content[wire.ARRAYS])) == B_AND_HEAD
    [call] = trainer.calls
    assert call["sigma"] is None and call["rng"] == int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
    assert list(tmp_path.iterdir()) == []  # no ledger, no release
    with caplog.at_level(logging.WARNING, logger="fedpeft.client"):
        refused = app.handle_train(msg, _ctx(**{wire.PARTITION_ID: 0, wire.MAX_EPSILON: 1}))
    reason = "this node allows at most epsilon=1 and the run has no DP (privacy.epsilon=inf)"
    assert _status(refused) == {wire.REFUSED: True, wire.CLIENT: "0", wire.REASON: reason}
    assert [r.getMessage() for r in caplog.records] == [f"client 0: {reason}"]
    assert len(trainer.calls) == 1
    floor = app.handle_train(msg, _ctx(**{wire.PARTITION_ID: 0, wire.MIN_NOISE_MULTIPLIER: 1.5}))
    assert _status(floor)[wire.REASON] == ("this node requires min-noise-multiplier=1.5 and the run has no DP "
                                           "(privacy.epsilon=inf)")


def test_handle_train_returns_a_parse_refusal(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                              trainer: Trainer) -> None:
    reply = app.handle_train(_msg(tiny_cfg, 3, tmp_path), _ctx())
    assert _status(reply)[wire.REFUSED] is True and trainer.calls == []


# ---- train / client_app -------------------------------------------------------------------
@pytest.mark.parametrize("error", [NodeRefusal("node says no"), wire.ProtocolError("bad message")])
def test_train_passes_refusals_and_protocol_errors_through(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def fail(msg: Any, context: Any) -> Message:
        raise error

    monkeypatch.setattr(app, "handle_train", fail)
    with pytest.raises(type(error)) as info:
        app.train(None, None)  # type: ignore[arg-type]
    assert info.value is error


def test_train_keeps_any_other_failures_text_on_the_node(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def fail(msg: Any, context: Any) -> Message:
        raise ValueError("label 'secret-label' in row 7")

    monkeypatch.setattr(app, "handle_train", fail)
    with caplog.at_level(logging.ERROR, logger="fedpeft.client"), pytest.raises(NodeRefusal) as info:
        app.train(None, None)  # type: ignore[arg-type]
    assert str(info.value) == "training failed on the node; details are in the node's log"
    assert type(info.value) is NodeRefusal and info.value.__cause__ is None and info.value.__suppress_context__
    [record] = caplog.records
    assert record.getMessage() == "training failed on this node" and record.exc_info is not None


def test_train_returns_the_handlers_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, Any]] = []
    sentinel = object()

    def handler(msg: Any, context: Any) -> Any:
        seen.append((msg, context))
        return sentinel

    monkeypatch.setattr(app, "handle_train", handler)
    assert app.train("m", "c") is sentinel and seen == [("m", "c")]  # type: ignore[arg-type]


def test_client_app_wraps_train_in_the_mods(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    order: list[str] = []

    def mod(name: str):  # type: ignore[no-untyped-def]
        def wrapped(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
            order.append(name)
            return call_next(msg, ctx)
        return wrapped

    msg = _msg(tiny_cfg, 1, tmp_path, **{wire.HETERO_PLAN: _plan_entry()})
    reply = app.client_app([mod("outer"), mod("inner")])(msg, _ctx())
    assert order == ["outer", "inner"]
    assert _status(reply)[wire.REASON] == _refusal_text("0")  # the handler is train
    assert _status(app.app(msg, _ctx()))[wire.REASON] == _refusal_text("0")
    assert isinstance(app.app, type(app.client_app()))
    assert not any(isinstance(v, ArrayRecord) for v in reply.content.values())


# ---- a device's rank tier, a deployed node's secret ---------------------------------------
def test_a_rank_tier_is_set_after_loading_and_before_training(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                              trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, ctx = _rt(tiny_cfg), _ctx()
    wire.DeviceDirective("Small", 8, 2).store(ctx.state)
    req = _request(_msg(tiny_cfg, 1, tmp_path, **{wire.HETERO_PLAN: _plan_entry()}), ctx)
    inputs = app._inputs(req)
    app._train(req, inputs, None, 1)  # a plugin without rank tiers trains its one rank
    ranks: list[tuple[Any, int, int, bool]] = []

    def set_client_rank(model: Any, rank: int) -> None:
        loaded = all((v == 0.5).all() for v in rt.plugin.trainable_state(model).values())
        ranks.append((model, rank, len(trainer.calls), bool(loaded)))

    monkeypatch.setattr(rt.plugin, "set_client_rank", set_client_rank, raising=False)
    app._train(req, inputs, None, 1)
    assert ranks == [(rt.model, 2, 1, True)]
    app._train(dataclasses.replace(req, device=None), inputs, None, 1)
    assert len(ranks) == 1


def test_a_deployed_node_keeps_its_secret_beside_its_ledger(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity,  # type: ignore[no-untyped-def]
                                                            trainer: Trainer) -> None:
    ctx = _ctx()
    _planned(tiny_cfg, tmp_path, ctx)
    req = _request(_msg(tiny_cfg, 1, tmp_path), ctx)
    deployed = dataclasses.replace(req, ident=dataclasses.replace(req.ident, partition_id=None, data_path="d.csv"))
    reply = app._train_round(deployed)
    assert set(wire.arrayrecord_to_state(reply.content[wire.ARRAYS])) == B_AND_HEAD
    assert (tmp_path / "client-0.secret").is_file()
    assert not secret_path(tmp_path, "0", deployed=False).exists()


# ---- FedSA-LoRA: local B, a personalised evaluation ---------------------------------------
@pytest.fixture()
def fedsa_cfg(tiny_cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(
        tiny_cfg.adapter, method="fedsa_lora", options=(("eval_fraction", 0.25), ("eval_sigma", 4.0))))


def test_parse_holds_out_the_personal_split(fedsa_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt = _rt(fedsa_cfg)
    req = _request(_msg(fedsa_cfg, 2, tmp_path), _ctx())
    assert req.personal == PersonalEvalParams(0.25, 4.0) and req.evaluates
    train_part, held = split_held_out(rt.data_for(req.ident, {}), 0.25, fedsa_cfg.seed, "0")
    assert req.held is not None and len(req.held) == 24 and len(req.data) == 72
    assert data_digest(req.held) == data_digest(held) and data_digest(req.data) == data_digest(train_part)
    assert data_digest(train_part) != data_digest(split_held_out(rt.data_for(req.ident, {}), 0.25, 1, "0")[0])
    assert data_digest(train_part) != data_digest(split_held_out(rt.data_for(req.ident, {}), 0.25, 0, "1")[0])


def test_a_personal_round_sends_a_and_head_and_the_recorded_accuracy(fedsa_cfg: RunConfig, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                     flwr_identity, trainer: Trainer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "personal_accuracy", lambda *args: 0.625)
    rt, ctx = _rt(fedsa_cfg), _ctx()
    ledger = Ledger(client="0", target_epsilon=6.0, delta=1e-5, noise_multiplier=2.0, sample_rate=Q, planned_steps=2,
                    reserved=[list(release_entry(4.0))])
    save_ledger(ledger, tmp_path, "0", ctx)
    sent = _incoming(rt)
    assert not any(".lora_B." in k for k in sent) and any(".lora_A." in k for k in sent)
    reply = app.handle_train(_msg(fedsa_cfg, 2, tmp_path, sent), ctx)
    metrics = dict(reply.content[wire.METRICS])
    assert metrics == {**DP_METRICS, wire.BYTES_UP: wire.state_nbytes(sent), wire.EPSILON: pytest.approx(
        2 * Q / 2.0 + 1 / 4.0), wire.PERSONAL_ACCURACY: 0.625, wire.PERSONAL_EXAMPLES: 24}
    assert set(wire.arrayrecord_to_state(reply.content[wire.ARRAYS])) == set(sent)  # B stays home
    local = wire.arrayrecord_to_state(ctx.state[app.LOCAL_STATE_KEY])
    assert local and all(".lora_B." in k for k in local)
    assert load_local(tmp_path, "0", config_hash(fedsa_cfg), 3)[0] == 2
    entries = Ledger.from_json((tmp_path / "client-0.json").read_text()).entries
    assert [(e.round, e.steps, e.sample_rate) for e in entries] == [(2, 2, Q), (2, 1, 1.0)]
    again = app.handle_train(_msg(fedsa_cfg, 2, tmp_path, sent), ctx)  # replayed: the accounted release again
    assert dict(again.content[wire.METRICS]) == metrics and len(trainer.calls) == 1


def test_a_deployed_node_reads_its_own_file_and_no_device(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    rt = _rt(tiny_cfg)
    labels = list(rt.layout[0].pool.label_names)
    rows = "".join(f"review {i} was {labels[i % 2]},{labels[i % 2]}\n" for i in range(6))
    (tmp_path / "own.csv").write_text("review,sentiment\n" + rows, encoding="utf-8")
    ctx = _ctx(**{wire.DATA_PATH: str(tmp_path / "own.csv"), wire.CLIENT_ID: "n1", wire.LEDGER_DIR: str(tmp_path),
                  wire.TEXT_COLUMN: "review", wire.LABEL_COLUMN: "sentiment"})
    wire.DeviceDirective("Small", 8, 2).store(ctx.state)  # no simulator hands a deployed node a device
    req = _request(_msg(tiny_cfg, 1, tmp_path, **{wire.LABEL_NAMES: json.dumps(labels)}), ctx)
    assert req.ident == ClientIdentity("n1", None, str(tmp_path / "own.csv"), tmp_path, tuple(labels))
    assert len(req.data) == 6 and req.data.texts[1] == f"review 1 was {labels[1]}"
    assert req.device is None and req.cfg is rt.cfg


def test_steps_follow_the_data_without_a_fixed_step_count(tiny_cfg: RunConfig, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, local_steps=0, local_epochs=2.0))
    req = _request(_msg(cfg, 1, tmp_path), _ctx())
    assert app._inputs(req).steps == 6  # 2 epochs of 96 examples in batches of 32
    assert app._inputs(dataclasses.replace(req, data=req.data.subset(np.arange(32)))).steps == 2
