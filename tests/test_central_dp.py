"""Client-level central DP: Flower's server-side clipping wrapper around AdapterAvg, and its
accountant (unit level; the real Flower run with both DP layers is in test_privacy_audit.py).

Issue 16: the checkpoint must hold only the noised release (finding 6), methods whose release
is not a weighted mean are refused, an error reply drops a client and not the round, and the
client-level epsilon uses the replace-one sensitivity 2 * w_max * clip (finding 7)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from inprocess_grid import NodeIds

from fedpeft.adapters import AdapterPlugin, get, plugins
from fedpeft.config import ConfigError
from fedpeft.load import parse_config
from fedpeft.privacy.central import ClientLevelAccountant
from fedpeft.server.checkpoint import CHECKPOINT_NAME, load_checkpoint, round_checkpoint, save_checkpoint
from fedpeft.server.loop import inner_strategy
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.central_dp import with_central_dp
from fedpeft.strategies.validation import StateSpec

SPEC = StateSpec({"w": ((100, 100), "float32")}, frozen_hash="h")


def _cfg(**central: Any):  # type: ignore[no-untyped-def]
    return parse_config({"privacy.epsilon": "inf", "train.clients": 2, "data.label_proportions": "0.5,0.5;0.5,0.5",
                         **{f"central.{k}": v for k, v in central.items()}})


def _cfg3(**central: Any):  # type: ignore[no-untyped-def]
    return parse_config({"privacy.epsilon": "inf", "train.clients": 3,
                         "data.label_proportions": "0.5,0.5;0.5,0.5;0.5,0.5",
                         **{f"central.{k}": v for k, v in central.items()}})


def _instruction() -> Message:
    return Message(content=RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(1))})}), dst_node_id=1,
                   message_type="train")


def _reply(value: float, examples: float, client: str) -> Message:
    out = _instruction()
    content = RecordDict({
        "arrays": state_to_arrayrecord({"w": np.full((100, 100), value, np.float32)}),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0}),
        "info": ConfigRecord({"client": client, "frozen-hash": "h"}),
    })
    return Message(content=content, reply_to=out)


def _round(cfg, values: list[float], examples: list[float], grid: Any = None):  # type: ignore[no-untyped-def]
    wrap, hooks = with_central_dp(cfg)
    assert wrap is not None
    strategy = wrap(AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"))
    global_state = state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)})
    strategy.configure_train(1, global_state, ConfigRecord(), grid or NodeIds(1, 2))
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
    # 2 equal clients, replace-one: sensitivity 2 * clip / 2 against noise std 1.2 * clip / 2 -> 0.6
    acc.compose(dp_event.GaussianDpEvent(0.6), 2)
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
    # replace-one moves the mean of 2 equal clients by up to 2 * clip / 2: sigma_eff = sigma / 2
    assert hook.effective_noise_multiplier([10.0, 10.0]) == pytest.approx(1.0)
    # one client holds 3/4 of the examples: it moves the mean 1.5x as far as with equal weights
    assert hook.effective_noise_multiplier([30.0, 10.0]) == pytest.approx(2.0 / (2 * 2 * 0.75))


# ---- finding 6: only the released (noised) state is kept or written -----------------------------

def test_attacker_with_the_run_directory_cannot_read_off_the_noise(flwr_identity, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Clipped updates are large against the noise, so the un-noised clipped aggregate is a
    # well-defined target: an attacker holding checkpoint.npz must find no array near it.
    cfg = _cfg(mode="server", clip=5.0, noise_multiplier=1.0)
    strategy, _, released = _round(cfg, [1.0, 3.0], [10.0, 30.0])
    clipped = [np.full((100, 100), v, np.float32) * min(1.0, 5.0 / (abs(v) * 100)) for v in (1.0, 3.0)]
    unnoised = 0.25 * clipped[0] + 0.75 * clipped[1]
    noise = released - unnoised
    assert noise.std() == pytest.approx(1.0 * 5.0 / 2, rel=0.05)  # the release really is noised
    inner = inner_strategy(strategy)
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, round_checkpoint(1, "h", {"w": released}, inner, [], {}, []))  # as the round loop does
    ckpt = load_checkpoint(path)
    stored = [*ckpt.state.values(), *ckpt.previous.values()]
    assert len(stored) == 2
    for arr in stored:
        assert not np.allclose(arr, unnoised, atol=0.5), "the checkpoint holds the un-noised aggregate"
        assert np.abs(arr - unnoised).std() > 1.0  # nothing closer to it than the noise itself
        assert np.array_equal(arr, released)  # only the release is kept (state and next round's previous)
    assert np.array_equal(inner.previous["w"], released)


# ---- finding 6: central DP only where the release is a weighted mean with identity server_step ---

def test_central_dp_is_refused_for_non_mean_methods() -> None:
    base = {"privacy.epsilon": "inf", "train.clients": 2, "data.label_proportions": "0.5,0.5;0.5,0.5",
            "central.mode": "server"}
    for method in ("ffa_lora", "lora"):
        assert parse_config({**base, "adapter.method": method}).central.enabled
    for method in ("osft", "triadapt_lora", "ffa_lora_hetero"):
        with pytest.raises(ConfigError, match=method) as info:
            parse_config({**base, "adapter.method": method})
        assert "weighted mean" in str(info.value) and "\n" not in str(info.value)
        parse_config({**base, "adapter.method": method, "central.mode": "off"})  # fine without central DP
    # every plugin that declares itself compatible keeps the base class's weighted mean and identity step
    compatible = [p for p in plugins() if p.central_dp_compatible]
    assert {"ffa_lora", "lora"} <= {p.name for p in compatible}
    for plugin in compatible:
        assert type(plugin).aggregate is AdapterPlugin.aggregate, plugin.name
        assert type(plugin).server_step is AdapterPlugin.server_step, plugin.name


# ---- finding 6: an error reply drops that client, not the round ---------------------------------

def test_an_error_reply_drops_the_client_not_the_round(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from dp_accounting import dp_event, rdp

    cfg = _cfg3(mode="server", clip=0.5, noise_multiplier=2.0)
    wrap, hooks = with_central_dp(cfg)
    assert wrap is not None
    strategy = wrap(AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"))
    strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}), ConfigRecord(),
                             NodeIds(1, 2, 3))
    crashed = Message(Error(0, "Traceback ...\nRuntimeError: CUDA out of memory"), reply_to=_instruction())
    replies = [_reply(1e-12, 10.0, "0"), crashed, _reply(1e-12, 10.0, "2")]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, "one error reply voided the round"
    report = inner_strategy(strategy).report
    assert [r.client for r in report.accepted] == ["0", "2"] and report.released
    assert list(report.failed.values()) == ["RuntimeError: CUDA out of memory"]
    # noise std = sigma * clip / m with the m = 3 the wrapper was built with (not the 2 that replied)
    assert arrays["w"].numpy().std() == pytest.approx(2.0 * 0.5 / 3, rel=0.05)
    # sensitivity of the 2-client mean under replace-one: 2 * clip / 2 -> sigma_eff = (2*0.5/3) / 0.5
    row: dict[str, Any] = {}
    hooks[0].on_round_end(1, row, report)
    assert row["central_noise_multiplier_effective"] == pytest.approx(2.0 / 3)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent((2.0 * 0.5 / 3) / (2 * 0.5 / 2)))
    assert row["epsilon_client_level"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)


def test_replies_that_do_not_match_the_global_state_are_rejected_before_clipping(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg3(mode="server", clip=0.5, noise_multiplier=1e-6)
    wrap, _ = with_central_dp(cfg)
    assert wrap is not None
    strategy = wrap(AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h"))
    strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}), ConfigRecord(),
                             NodeIds(1, 2, 3))
    bad = _reply(1.0, 10.0, "1")
    bad.content["arrays"] = state_to_arrayrecord({"w": np.ones((100, 50), np.float32)})  # e.g. a rank-50 B
    arrays, _ = strategy.aggregate_train(1, [_reply(100.0, 10.0, "0"), bad, _reply(100.0, 10.0, "2")])
    assert arrays is not None
    report = inner_strategy(strategy).report
    assert [r.client for r in report.accepted] == ["0", "2"] and "client-1" in report.rejected
    assert np.linalg.norm(arrays["w"].numpy()) == pytest.approx(0.5, rel=1e-3)  # the others were clipped


# ---- finding 7: the client-level sensitivity matches the stated relation -------------------------

def _independent_epsilon(sigma: float, clip: float, m: int, w_max: float, releases: int, delta: float,
                         accountant: str = "rdp") -> float:
    """dp-accounting's epsilon for the Gaussian mechanism with noise std sigma*clip/m and L2
    sensitivity 2*w_max*clip (replace-one of one client's update in a weighted mean)."""
    from dp_accounting import dp_event, pld, rdp

    z = (sigma * clip / m) / (2 * w_max * clip)
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_event.GaussianDpEvent(z), releases)
    return float(acc.get_epsilon(delta))


def test_three_equal_clients_three_releases_match_an_independent_accountant(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg3(mode="server", clip=0.5, noise_multiplier=1.0, delta=1e-3)
    strategy, hooks, _ = _round(cfg, [1.0, 2.0, 3.0], [10.0, 10.0, 10.0], NodeIds(1, 2, 3))
    report = inner_strategy(strategy).report
    rows: list[dict[str, Any]] = [{}, {}, {}]
    for i, row in enumerate(rows):
        hooks[0].on_round_end(i + 1, row, report)
    eps = rows[-1]["epsilon_client_level"]
    assert eps == pytest.approx(_independent_epsilon(1.0, 0.5, 3, 1 / 3, 3, 1e-3), rel=1e-6)
    assert eps == pytest.approx(17.52, abs=0.01)  # the old sigma/(m*w_max) gave 7.0
    assert eps > _independent_epsilon(1.0, 0.5, 3, 1 / 3, 3, 1e-3, "pld")  # RDP is an upper bound of PLD's
    assert rows[-1]["central_noise_multiplier_effective"] == pytest.approx(0.5)
    for key, text in [("epsilon_client_level_unit", "client-level"), ("epsilon_client_level_relation", "replace-one"),
                      ("epsilon_client_level_accountant", "rdp")]:
        assert text in rows[-1][key]
    assert rows[-1]["epsilon_client_level_delta"] == 1e-3


# ---- the accountant's bookkeeping, exactly (found by `make mutation`) ------------------------------

def test_m_is_the_clients_sampled_per_round_or_all_of_them() -> None:
    from fedpeft.privacy.central import sampled_clients

    assert sampled_clients(_cfg3(mode="server")) == 3
    sampled = parse_config({"privacy.epsilon": "inf", "train.clients": 3, "train.clients_per_round": 2,
                            "data.label_proportions": "0.5,0.5;0.5,0.5;0.5,0.5", "central.mode": "server"})
    assert sampled_clients(sampled) == 2 and ClientLevelAccountant(sampled).sampled == 2
    # sigma / (2 * m * w_max) with m = 2 sampled of 3, equal weights
    assert ClientLevelAccountant(sampled).effective_noise_multiplier([5.0, 5.0]) == pytest.approx(1.0 / 2)


def test_a_round_without_a_release_spends_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from fedpeft.privacy.central import ACCOUNTANT, RELATION, UNIT

    hook = ClientLevelAccountant(_cfg(mode="server", noise_multiplier=1.5, delta=1e-4))
    report = type("Report", (), {"released": False, "accepted": []})()
    row: dict[str, Any] = {}
    hook.on_round_end(1, row, report)
    assert np.isnan(row.pop("central_noise_multiplier_effective"))
    assert row == {"epsilon_client_level": 0.0, "epsilon_client_level_unit": UNIT,
                   "epsilon_client_level_relation": RELATION, "epsilon_client_level_delta": 1e-4,
                   "epsilon_client_level_accountant": ACCOUNTANT, "central_releases": 0}
    assert UNIT.startswith("client-level") and "sensitivity 2*w_max*clip" in RELATION and ACCOUNTANT.startswith("rdp")
    with caplog.at_level("INFO", logger="fedpeft.server"):
        hook.on_start(None, None, None)
    assert "noise multiplier 1.5 over 2 sampled clients" in caplog.text and "delta=0.0001" in caplog.text


def test_the_start_line_states_the_mechanism_with_its_unit_relation_and_accountant(
        caplog: pytest.LogCaptureFixture) -> None:
    from fedpeft.privacy.central import ACCOUNTANT, RELATION, UNIT

    hook = ClientLevelAccountant(_cfg(mode="server", clip=0.25, noise_multiplier=1.5, delta=1e-4))
    with caplog.at_level("INFO", logger="fedpeft.server"):
        hook.on_start(None, None, None)
    assert [r.getMessage() for r in caplog.records if r.name == "fedpeft.server"] == [
        "central DP: server-side clipping of client updates to 0.25, noise multiplier 1.5 over 2 sampled clients; "
        f"{UNIT} epsilon, relation {RELATION}, at delta=0.0001, accountant {ACCOUNTANT}"]
