"""Client-level central DP: Flower's server-side clipping wrapper around AdapterAvg, and its
accountant (unit level; the real Flower run with both DP layers is in test_privacy_audit.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from adapters import get
from fl_server.loop import inner_strategy
from privacy.central import ClientLevelAccountant, with_central_dp
from strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from strategies.validation import StateSpec
from task.config import ConfigError, parse_config

SPEC = StateSpec({"w": ((100, 100), "float32")}, frozen_hash="h")


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _cfg(**central: Any):  # type: ignore[no-untyped-def]
    return parse_config({"privacy.epsilon": "inf", "train.clients": 2, "data.label_proportions": "0.5,0.5;0.5,0.5",
                         **{f"central.{k}": v for k, v in central.items()}})


def _reply(value: float, examples: float, client: str) -> Message:
    out = Message(content=RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(1))})}), dst_node_id=1,
                  message_type="train")
    content = RecordDict({
        "arrays": state_to_arrayrecord({"w": np.full((100, 100), value, np.float32)}),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0}),
        "info": ConfigRecord({"client": client, "frozen-hash": "h"}),
    })
    return Message(content=content, reply_to=out)


def _round(cfg, values: list[float], examples: list[float]):  # type: ignore[no-untyped-def]
    wrap, hooks = with_central_dp(cfg)
    assert wrap is not None
    strategy = wrap(AdapterAvg(get("ffa_lora"), cfg, SPEC, "", "h"))
    global_state = state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)})
    strategy.configure_train(1, global_state, ConfigRecord(), FakeGrid())
    replies = [_reply(v, n, str(i)) for i, (v, n) in enumerate(zip(values, examples, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, hooks, arrays["w"].numpy()


def test_config_validation_is_one_line() -> None:
    assert _cfg().central.mode == "off"
    assert _cfg(mode="server").central.enabled
    for key, value, text in [("mode", "client", "fixedclipping_mod"), ("mode", "x", "allowed"),
                             ("noise_multiplier", 0, "positive"), ("clip", -1, "positive"), ("delta", 1.5, "(0, 1)")]:
        with pytest.raises(ConfigError, match=text):
            _cfg(**{key: value})


def test_off_leaves_the_strategy_alone() -> None:
    wrap, hooks = with_central_dp(_cfg())
    assert wrap is None and hooks == []


def test_updates_are_clipped_and_noise_has_the_flower_scale(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    # huge updates, almost no noise: the aggregate is the mean of updates clipped to norm 0.5
    cfg = _cfg(mode="server", clip=0.5, noise_multiplier=1e-6)
    strategy, _, agg = _round(cfg, [100.0, 100.0], [10.0, 10.0])
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(inner_strategy(strategy), AdapterAvg)
    assert np.linalg.norm(agg) == pytest.approx(0.5, rel=1e-3)
    # a negligible update (an exactly zero one divides by zero inside Flower's clipping):
    # the aggregate is pure noise, std = sigma * clip / m
    cfg = _cfg(mode="server", clip=0.5, noise_multiplier=2.0)
    _, _, agg = _round(cfg, [1e-12, 1e-12], [10.0, 10.0])
    assert agg.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.05)


def test_client_level_epsilon_is_accounted_per_release(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from dp_accounting import dp_event, rdp

    cfg = _cfg(mode="server", noise_multiplier=1.2, delta=1e-3)
    strategy, hooks, _ = _round(cfg, [1.0, 2.0], [10.0, 10.0])
    hook = hooks[0]
    report = inner_strategy(strategy).report
    rows: list[dict[str, Any]] = [{}, {}]
    hook.on_round_end(1, rows[0], report)
    hook.on_round_end(2, rows[1], report)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(1.2), 2)
    assert rows[1]["epsilon_client_level"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    assert rows[0]["epsilon_client_level"] < rows[1]["epsilon_client_level"]
    assert "client-level" in rows[1]["epsilon_client_level_unit"]
    # a round without accepted replies releases nothing and spends nothing
    empty = dataclasses.replace(report, accepted=[], released=False)
    rows.append({})
    hook.on_round_end(3, rows[2], empty)
    assert rows[2]["epsilon_client_level"] == rows[1]["epsilon_client_level"] and rows[2]["central_releases"] == 2


def test_unequal_client_weights_lower_the_effective_noise() -> None:
    hook = ClientLevelAccountant(_cfg(mode="server", noise_multiplier=2.0))
    assert hook.effective_noise_multiplier([10.0, 10.0]) == pytest.approx(2.0)
    # one client holds 3/4 of the examples: it moves the mean 1.5x as far as with equal weights
    assert hook.effective_noise_multiplier([30.0, 10.0]) == pytest.approx(2.0 / (2 * 0.75))
