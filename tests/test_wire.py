"""The protocol module: its keys are the ones on the wire, and every codec round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Message, RecordDict

import fedpeft.wire as wire

# What a DP reply may carry (README's threat model): the state and public values only.
DP_KEYS = {"num-examples", "steps", "bytes-up", "epsilon", "delta", "noise-multiplier", "sample-rate"}


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"b.lora_B": rng.normal(size=(4, 2)).astype(np.float32), "classifier.bias": np.arange(3, dtype=np.float64),
            "t": np.asfortranarray(rng.normal(size=(3, 5)).astype(np.float32))}


def test_state_round_trips_through_an_array_record() -> None:
    state = _state()
    record = wire.state_to_arrayrecord(state)
    back = wire.arrayrecord_to_state(record)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert wire.record_nbytes(record) == wire.state_nbytes(state) == 4 * 2 * 4 + 3 * 8 + 3 * 5 * 4


def test_round_config_round_trips_under_its_wire_keys() -> None:
    rc = wire.RoundConfig(3, "seed = 1\n", "abc", frozen_hash="f00", attempt=2)
    record = rc.to_record({"ledger-dir": "/l", "label-names": '["a"]'})
    assert dict(record) == {"server-round": 3, "fedpeft-config": "seed = 1\n", "config-hash": "abc",
                            "frozen-hash": "f00", "attempt": 2, "ledger-dir": "/l", "label-names": '["a"]'}
    assert wire.RoundConfig.from_record(record) == rc
    del record["attempt"], record["frozen-hash"]
    assert wire.RoundConfig.from_record(record) == wire.RoundConfig(3, "seed = 1\n", "abc")


def test_a_round_config_without_its_hash_is_a_protocol_error() -> None:
    record = wire.RoundConfig(1, "", "h").to_record()
    del record["config-hash"]
    with pytest.raises(wire.ProtocolError, match="'config-hash'"):
        wire.RoundConfig.from_record(record)
    with pytest.raises(wire.ProtocolError, match="integers"):
        wire.RoundConfig.from_record({**wire.RoundConfig(1, "", "h").to_record(), "server-round": "one"})


def test_dp_reply_metrics_are_exactly_the_public_ones() -> None:
    diag = wire.diagnostics(0.7, 0.9, 0.5, 64, 1.5)
    dp = wire.reply_metrics(True, 96, 2, 100, 0.4, 1e-5, 1.1, 0.3, diag)
    assert set(dp) == DP_KEYS and dp["noise-multiplier"] == 1.1 and dp["sample-rate"] == 0.3
    wire.check_dp_metrics(dp)
    plain = wire.reply_metrics(False, 96, 2, 100, 0.4, 1e-5, None, 0.3, diag)
    assert set(plain) == {"num-examples", "steps", "bytes-up", "epsilon", "noise-multiplier", "train-loss",
                          "train-loss-first", "train-loss-last", "samples-seen", "seconds"}
    assert math.isinf(plain["epsilon"]) and plain["noise-multiplier"] == 0.0
    with pytest.raises(wire.ProtocolError, match="samples-seen, seconds, train-loss"):
        wire.check_dp_metrics(plain)


def test_replies_carry_their_records(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    sent = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    release = wire.train_reply(sent, _state(), {"num-examples": 3}, {"client": "0", "frozen-hash": "h"})
    assert set(release.content.keys()) == {"arrays", "metrics", "info"}
    assert set(wire.arrayrecord_to_state(release.content["arrays"])) == set(_state())
    refused = wire.refusal(sent, "0", "no budget", epsilon=1.5)
    assert dict(refused.content["status"]) == {"refused": True, "client": "0", "reason": "no budget", "epsilon": 1.5}
    skipped = wire.refusal(sent, "2", "offline", hetero_skip=True)
    assert dict(skipped.content["status"]) == {"refused": True, "client": "2", "reason": "offline", "hetero-skip": True}
    lost = wire.timed_out(sent, "1", "late", 0.25)
    assert dict(lost.content["status"]) == {"timed-out": True, "client": "1", "epsilon": 0.25, "reason": "late"}


def test_hetero_plan_round_trips_per_client() -> None:
    raw = wire.encode_hetero_plan(["Big", "Small"], [1, 0, 1], {"Big": (32, 8), "Small": (4, 2)}, {"2": "offline"})
    assert json.loads(raw) == {"profiles": ["Big", "Small"], "assign": [1, 0, 1],
                               "plan": {"Big": {"physical_batch": 32, "rank": 8},
                                        "Small": {"physical_batch": 4, "rank": 2}}, "skip": {"2": "offline"}}
    assert wire.decode_hetero_plan(raw, 0) == (wire.DeviceDirective("Small", 4, 2), "")
    assert wire.decode_hetero_plan(raw, 1) == (wire.DeviceDirective("Big", 32, 8), "")
    assert wire.decode_hetero_plan(raw, 2) == (wire.DeviceDirective("Small", 4, 2), "offline")
    with pytest.raises(wire.ProtocolError, match="partition 3"):
        wire.decode_hetero_plan(raw, 3)
    with pytest.raises(wire.ProtocolError, match="partition 0"):
        wire.decode_hetero_plan("{not json", 0)


def test_device_directive_round_trips_through_context_state() -> None:
    state = RecordDict()
    assert wire.DeviceDirective.read(state) is None
    directive = wire.DeviceDirective("Small", 4, 2)
    directive.store(state)
    assert wire.DeviceDirective.read(state) == directive
    wire.DeviceDirective.clear(state)
    assert wire.DeviceDirective.read(state) is None and wire.DEVICE_STATE not in state
    # the replay key keeps the form the first release format used (stored releases stay valid)
    old = json.dumps({"profile": "Small", "physical_batch": 4, "rank": 2, "skip": ""}, sort_keys=True)
    assert directive.replay_part() == old
