"""The server's send/receive step (fedpeft.server.loop.send_and_receive) on a fake grid.

Regression: when a deployed node went offline mid-round, the SuperLink answered its
instruction with an error reply whose sender is the SuperLink itself (node ID 1), and the
server logged and recorded ``node-1 failed`` -- a node that did not fail (or does not
exist). Error replies are now attributed to the node the instruction went to.

Then AdapterAvg's own contract, each part found unpinned by ``make mutation``
(``benchmarks/results/mutation.md``): its checkpointed state is a copy both ways, a malformed
state is refused with its reason, the plugin's ``aggregate`` sees the last release, a reply
names its sender only through its info record, and under a wrapper that defers the release
(central DP) the base never keeps its un-noised aggregate, not even when the noising fails.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from inprocess_grid import NodeIds

import fedpeft.wire as wire
from fedpeft.adapters import get
from fedpeft.load import parse_config
from fedpeft.server.loop import attribute_reply, send_and_receive
from fedpeft.strategies import adapter_avg
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.registry import build_strategy
from fedpeft.strategies.state import strategy_chain
from fedpeft.strategies.validation import StateSpec
from tests.test_central_dp import _instruction, _reply

SPEC = StateSpec({"w": ((4, 4), "float32")}, frozen_hash="h")
SPEC100 = StateSpec({"w": ((100, 100), "float32")}, frozen_hash="h")  # test_central_dp's replies
SUPERLINK_NODE_ID = 1


class FakeGrid:
    """Push assigns message ids (as Flower's grids do, on the message objects); each pull
    hands out the next batch of replies that ``script`` makes for the pushed messages."""

    def __init__(self, nodes: list[int], script: list[list[tuple[int, str]]]) -> None:
        self.nodes, self.script, self.pulls = nodes, script, 0
        self.sent: dict[int, Message] = {}

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent[msg.metadata.dst_node_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        batch = self.script[self.pulls] if self.pulls < len(self.script) else []
        self.pulls += 1
        out = []
        for node, kind in batch:
            ins = self.sent[node]
            if kind == "ok":
                out.append(Message(RecordDict({
                    "arrays": state_to_arrayrecord({"w": np.full((4, 4), float(node), np.float32)}),
                    "metrics": MetricRecord({"num-examples": 10.0, "train-loss": 0.5, "epsilon": 1.0}),
                    "info": ConfigRecord({"client": f"c{node}", "frozen-hash": "h"})}), reply_to=ins))
            else:  # what the SuperLink makes when the node went offline (Flower's own function)
                out.append(create_message_error_unavailable_res_message(ins.metadata, "node_unavail"))
        return out


class MeanPlugin:
    """Just enough of an adapter plugin for AdapterAvg: a weighted mean (no model, no registry)."""

    name, exact_average = "mean", True

    def aggregate(self, states: list[dict[str, np.ndarray]], weights: list[float],
                  previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.average([s[k] for s in states], axis=0, weights=weights) for k in states[0]}

    def server_step(self, server_round: int, state: dict[str, np.ndarray], cfg: object) -> dict[str, np.ndarray]:
        return state


def _strategy() -> AdapterAvg:
    cfg = parse_config({"privacy.epsilon": "inf", "train.clients": 3, "faults.min_clients": 1})
    return AdapterAvg.from_config(MeanPlugin(), cfg, SPEC, "", "h")  # type: ignore[arg-type]


@pytest.mark.usefixtures("flwr_identity")
def test_an_offline_nodes_error_reply_names_that_node(caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid([5, 7, 9], [[(5, "ok")], [(7, "offline"), (9, "ok")]])
    strategy = _strategy()
    messages = list(strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((4, 4), np.float32)}),
                                             ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = send_and_receive(grid, messages, timeout=10, pull_interval=0.01)  # type: ignore[arg-type]
    assert grid.pulls == 2 and len(replies) == 3
    raw = create_message_error_unavailable_res_message(grid.sent[7].metadata, "node_unavail")
    assert raw.metadata.src_node_id == SUPERLINK_NODE_ID  # Flower's reply names the SuperLink ...
    err = next(m for m in replies if m.has_error())
    assert err.metadata.src_node_id == 7  # ... ours names the node that was sent the instruction
    assert err.metadata.reply_to_message_id == grid.sent[7].metadata.message_id
    assert err.error.code == raw.error.code and err.error.reason == raw.error.reason
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        strategy.aggregate_train(1, replies)
    assert set(strategy.report.failed) == {"node-7"}
    assert "node-7 failed" in caplog.text and "node-1 " not in caplog.text
    assert sorted(r.client for r in strategy.report.accepted) == ["c5", "c9"]


@pytest.mark.usefixtures("flwr_identity")
def test_replies_pass_through_and_the_wait_is_bounded() -> None:
    grid = FakeGrid([5, 7, 9], [[(5, "ok")]])  # nodes 7 and 9 never answer
    strategy = _strategy()
    messages = list(strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((4, 4), np.float32)}),
                                             ConfigRecord(), grid))  # type: ignore[arg-type]
    t0 = time.monotonic()
    replies = send_and_receive(grid, messages, timeout=0.3, pull_interval=0.05)  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - t0 < 3.0 and grid.pulls >= 3
    assert len(replies) == 1 and replies[0].metadata.src_node_id == 5 and not replies[0].has_error()
    sent = {m.metadata.message_id: m for m in messages}
    assert attribute_reply(replies[0], sent) is replies[0]  # a good reply is never rebuilt


# ---- AdapterAvg's own contract (module doc) ------------------------------------------------


class RecordingPlugin(MeanPlugin):
    """The weighted mean, remembering the ``previous`` each ``aggregate`` was given."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def aggregate(self, states: list[dict[str, np.ndarray]], weights: list[float],
                  previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append(previous if previous is None else {k: v.copy() for k, v in previous.items()})
        return super().aggregate(states, weights, previous)


def _strategy_of(plugin: Any = None, **extra: Any) -> AdapterAvg:
    cfg = parse_config({"privacy.epsilon": "inf", "train.clients": 2, **extra})
    return AdapterAvg.from_config(plugin or MeanPlugin(), cfg, SPEC100, "", "h")


def _round(strategy: Any, server_round: int, values: tuple[float, float]) -> ArrayRecord:
    strategy.configure_train(server_round, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}),
                             ConfigRecord(), NodeIds(1, 2))
    arrays, _ = strategy.aggregate_train(server_round, [_reply(v, 10.0, str(i)) for i, v in enumerate(values)])
    assert arrays is not None
    return arrays


def test_the_state_dict_is_a_copy_both_ways(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    strategy = _strategy_of()
    _round(strategy, 1, (1.0, 3.0))
    out = strategy.state_dict()
    out["previous"]["w"][:] = 99.0  # a caller writing into what it was given ...
    assert np.all(strategy.previous["w"] == 2.0)  # ... does not reach the strategy
    given = {"previous": {"w": np.full((100, 100), 5.0, np.float32)}, "sampler": out["sampler"]}
    other = _strategy_of()
    other.load_state_dict(given)
    given["previous"]["w"][:] = -1.0  # nor does writing into what it was loaded from
    assert np.all(other.previous["w"] == 5.0)


@pytest.mark.parametrize("previous", [[np.zeros(2)], {"w": [1.0, 2.0]}, {"w": np.zeros(2), "b": 3.0}])
def test_a_malformed_previous_is_refused_with_its_reason(previous: Any) -> None:
    strategy = _strategy_of()
    sampler = strategy.state_dict()["sampler"]
    with pytest.raises(ValueError, match=r"^AdapterAvg state: previous must map names to arrays$"):
        strategy.load_state_dict({"previous": previous, "sampler": sampler})
    assert strategy.previous == {}  # nothing half-loaded


def test_the_plugin_aggregates_with_the_last_release(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    plugin = RecordingPlugin()
    strategy = _strategy_of(plugin)
    _round(strategy, 1, (1.0, 3.0))
    _round(strategy, 2, (5.0, 7.0))
    assert plugin.seen[0] == {}  # nothing released before round 1
    assert set(plugin.seen[1]) == {"w"} and np.all(plugin.seen[1]["w"] == 2.0)  # round 1's release


def test_only_the_info_record_names_a_sender(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """A tensor or a metric called ``client`` is not the sender's name: the reply, rejected for its
    extra tensor, is logged and recorded under the node it came from."""
    strategy = _strategy_of()
    strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}), ConfigRecord(),
                             NodeIds(1, 2))
    content = RecordDict({
        "arrays": state_to_arrayrecord({"w": np.zeros((100, 100), np.float32), "client": np.zeros(1, np.float32)}),
        "metrics": MetricRecord({"num-examples": 10.0, "client": 7.0}),
    })
    reply = Message(content=content, reply_to=_instruction())
    assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert list(strategy.report.rejected) == [f"node-{reply.metadata.src_node_id}"]


def test_the_summary_names_the_plugin_the_clients_and_exactness(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy_of(**{"train.clients_per_round": 2})
    with caplog.at_level(logging.INFO, logger="fedpeft.server"):
        strategy.summary()
    assert [r.getMessage() for r in caplog.records if r.name == "fedpeft.server"] == ["AdapterAvg(mean): 2 clients per round, exact averaging: True"]


def test_a_deferred_release_keeps_nothing_when_the_noising_fails(flwr_identity,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"privacy.epsilon": "inf", "train.clients": 2, "central.mode": "server", "central.clip": 0.5,
                        "central.noise_multiplier": 2.0})
    strategy, _ = build_strategy(cfg, get("ffa_lora"), SPEC100, "", "h")
    base = strategy_chain(strategy)[-1]
    _round(strategy, 1, (1e-3, 1e-3))
    released = base.previous["w"].copy()

    class Broken:
        def normal(self, *args: Any, **kwargs: Any) -> np.ndarray:
            raise RuntimeError("no entropy")

    monkeypatch.setattr(strategy, "_noise", Broken())
    with pytest.raises(RuntimeError, match="no entropy"):
        _round(strategy, 2, (1e-3, 1e-3))
    assert np.array_equal(base.previous["w"], released)  # still round 1's noised release, not round 2's clean mean


def _sent_to(node: int) -> Message:
    return Message(content=RecordDict({"arrays": state_to_arrayrecord({"x": np.zeros(1)})}), dst_node_id=node,
                   message_type="train")


def test_failed_timed_out_and_refused_replies_are_recorded_with_their_reason(  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    strategy = _strategy_of()
    strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}), ConfigRecord(),
                             NodeIds(1, 2))
    last = "RuntimeError: " + "x" * 400  # only the traceback's last line, cut to 300 characters
    replies = [Message(Error(0, f"Traceback (most recent call last):\n  File ...\n{last}\n"), reply_to=_sent_to(5)),
               wire.timed_out(_sent_to(6), "c3", "deadline 5 s", 1.0),
               wire.status_reply(_sent_to(7), {wire.TIMED_OUT: True}),  # no client, no reason given
               wire.refusal(_sent_to(8), "c4", "budget: epsilon 1.2 > 1.0"),
               wire.status_reply(_sent_to(9), {wire.REFUSED: True}), _reply(1.0, 10.0, "0")]
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and [r.client for r in strategy.report.accepted] == ["0"]
    assert strategy.report.failed == {"node-5": last[:300], "c3": "deadline 5 s", "node-7": "timed out"}
    assert strategy.report.refused == {"c4": "budget: epsilon 1.2 > 1.0", "node-9": "budget"}
    assert strategy.report.rejected == {}
    assert [r.getMessage() for r in caplog.records if r.name == "fedpeft.server"] == [
        f"round 1: node-5 failed: {last[:300]}", "round 1: client c3 timed out: deadline 5 s",
        "round 1: client node-7 timed out: timed out", "round 1: client c4 refused: budget: epsilon 1.2 > 1.0",
        "round 1: client node-9 refused: budget"]


def test_replies_are_averaged_in_client_id_order(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """Numeric ids in numeric order, then names: the float sum does not depend on arrival."""
    strategy = _strategy_of(**{"train.clients": 4})
    strategy.configure_train(1, state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)}), ConfigRecord(),
                             NodeIds(1, 2, 3, 4))
    strategy.aggregate_train(1, [_reply(1.0, 10.0, c) for c in ("b", "10", "a", "9")])
    assert [r.client for r in strategy.report.accepted] == ["9", "10", "a", "b"]


# ---- configure_train: waiting for nodes, sampling, the attempt, the report ------------------


class FakeClock:
    """``time`` for adapter_avg: ``sleep`` records its argument and moves ``monotonic`` on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ArrivingNodes:
    """A grid whose ``get_node_ids`` answers the next listing each time (the last one stays)."""

    def __init__(self, *listings: list[int]) -> None:
        self.listings = list(listings)

    def get_node_ids(self) -> list[int]:
        return list(self.listings.pop(0) if len(self.listings) > 1 else self.listings[0])


def _direct(clients_per_round: int, **kwargs: Any) -> AdapterAvg:
    """AdapterAvg built from its primitives, every optional one left at its default unless given."""
    cfg = parse_config({"privacy.epsilon": "inf", "train.clients": 6})
    return AdapterAvg(MeanPlugin(), SPEC100, clients_per_round=clients_per_round,  # type: ignore[arg-type]
                      plugin_cfg=cfg, **kwargs)


ZERO100 = state_to_arrayrecord({"w": np.zeros((100, 100), np.float32)})


def _on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeClock, AdapterAvg]:
    """A strategy wanting 3 nodes whose waits run on a fake clock (no real sleep)."""
    clock = FakeClock()
    monkeypatch.setattr(adapter_avg, "time", clock)
    return clock, _direct(3)


def _server_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedpeft.server"]


def test_configure_train_waits_a_second_at_a_time_for_late_nodes(  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    clock, strategy = _on_a_fake_clock(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fedpeft.server"):
        messages = list(strategy.configure_train(3, ZERO100, ConfigRecord(),
                                                 ArrivingNodes([9], [9, 4], [9, 4, 2])))  # type: ignore[arg-type]
    assert clock.sleeps == [1.0, 1.0]  # until the third node is there, not a second longer
    assert [m.metadata.dst_node_id for m in messages] == [2, 4, 9]  # the nodes listed last, sorted
    assert _server_log(caplog) == ["round 3: waiting for nodes (1/3 connected)",
                                   "round 3: waiting for nodes (2/3 connected)"]


def test_configure_train_gives_up_waiting_after_node_wait_s(  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    """300 s by default, then the round goes to the nodes there are, without drawing a sample."""
    clock, strategy = _on_a_fake_clock(monkeypatch)
    sampler = strategy.rng.getstate()
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        messages = list(strategy.configure_train(5, ZERO100, ConfigRecord(), NodeIds(7, 2)))
    assert clock.sleeps == [1.0] * 300 and clock.now == 400.0
    assert [m.metadata.dst_node_id for m in messages] == [2, 7] and strategy.rng.getstate() == sampler
    assert _server_log(caplog) == ["round 5: only 2 nodes connected, 3 wanted"]
    assert strategy.report.sent_to == 2
    strategy.node_wait_s, clock.sleeps = 2.5, []
    strategy.configure_train(6, ZERO100, ConfigRecord(), NodeIds(7, 2))
    assert clock.sleeps == [1.0, 1.0, 1.0]  # still short of the deadline after two


def test_configure_train_with_enough_nodes_neither_waits_nor_draws(  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    clock, strategy = _on_a_fake_clock(monkeypatch)
    sampler = strategy.rng.getstate()
    with caplog.at_level(logging.INFO, logger="fedpeft.server"):
        messages = list(strategy.configure_train(2, ZERO100, ConfigRecord(), NodeIds(3, 1, 2)))
    assert clock.sleeps == [] and _server_log(caplog) == []
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]
    assert strategy.rng.getstate() == sampler  # all nodes sent to: the sampler does not move on
    assert strategy.report.sent_to == 3 and strategy.report.bytes_down == 3 * 100 * 100 * 4


@pytest.mark.parametrize(("config", "attempt"), [({}, 0), ({"attempt": 2}, 2), ({"attempt": "2"}, 0),
                                                 ({"attempt": 1.0}, 0)])
def test_the_attempt_the_loop_passes_goes_into_every_instruction_and_the_report(  # type: ignore[no-untyped-def]
        config: dict[str, Any], attempt: int, flwr_identity) -> None:
    """An integer ``attempt`` is sent on; none, or anything else, is attempt 0."""
    strategy = _direct(2)
    messages = list(strategy.configure_train(4, ZERO100, ConfigRecord(config), NodeIds(1, 2)))
    for msg in messages:
        sent = wire.RoundConfig.from_record(wire.round_config_of(msg))
        assert (sent.server_round, sent.attempt) == (4, attempt)
        assert type(msg.content[wire.CONFIG][wire.ATTEMPT]) is int
    assert strategy.report.attempt == attempt and strategy.report.server_round == 4


# ---- aggregate_train: what the report and the aggregate say ----------------------------------


class StepRecordingPlugin(MeanPlugin):
    """The weighted mean, remembering the round and configuration each ``server_step`` was given."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, Any]] = []

    def server_step(self, server_round: int, state: dict[str, np.ndarray], cfg: object) -> dict[str, np.ndarray]:
        self.steps.append((server_round, cfg))
        return state


def _with_loss(msg: Message, loss: float) -> Message:
    msg.content.metric_records[wire.METRICS][wire.TRAIN_LOSS] = loss
    return msg


def test_aggregate_train_reports_bytes_rejections_and_the_weighted_loss(  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    plugin = StepRecordingPlugin()
    cfg = parse_config({"privacy.epsilon": "inf", "train.clients": 3})
    strategy = AdapterAvg.from_config(plugin, cfg, SPEC100, "", "h")  # type: ignore[arg-type]
    strategy.configure_train(4, ZERO100, ConfigRecord(), NodeIds(1, 2, 3))
    bad = _reply(1.0, 10.0, "5")
    bad.content[wire.ARRAYS] = state_to_arrayrecord({"w": np.zeros((3, 3), np.float32)})
    replies = [_with_loss(_reply(1.0, 10.0, "0"), 0.2), bad, _with_loss(_reply(3.0, 30.0, "1"), 0.6)]
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        arrays, metrics = strategy.aggregate_train(4, replies)
    report = strategy.report
    assert report.bytes_up == 2 * 100 * 100 * 4 + 3 * 3 * 4  # every reply's upload, the rejected one's too
    reason = "w: shape (3, 3) != expected (100, 100)"
    assert report.rejected == {"client-5": reason}
    assert _server_log(caplog) == [f"round 4: rejected reply from client-5: {reason}"]
    assert report.released is True and [r.client for r in report.accepted] == ["0", "1"]
    assert len(plugin.steps) == 1 and plugin.steps[0][0] == 4 and plugin.steps[0][1] is cfg
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.5)
    assert metrics is not None and set(metrics) == {wire.NUM_EXAMPLES, "clients", wire.TRAIN_LOSS}
    assert metrics[wire.NUM_EXAMPLES] == 40.0 and metrics["clients"] == 2
    assert metrics[wire.TRAIN_LOSS] == pytest.approx((0.2 * 10 + 0.6 * 30) / 40)


def test_too_few_valid_replies_average_nothing_in(  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture, flwr_identity) -> None:
    """``faults.min_clients`` valid replies are needed (from_config); built directly, one is enough."""
    strategy = _strategy_of(**{"faults.min_clients": 2})
    strategy.configure_train(2, ZERO100, ConfigRecord(), NodeIds(1, 2))
    with caplog.at_level(logging.WARNING, logger="fedpeft.server"):
        assert strategy.aggregate_train(2, [_reply(1.0, 10.0, "0")]) == (None, None)
    assert _server_log(caplog) == ["round 2: 1 valid replies, 2 needed (faults.min_clients); nothing averaged in"]
    assert strategy.report.released is False and strategy.previous == {}
    direct = _direct(2)
    direct.configure_train(2, ZERO100, ConfigRecord(), NodeIds(1, 2))
    arrays, _ = direct.aggregate_train(2, [_reply(1.0, 10.0, "0")])
    assert arrays is not None and direct.report.released is True


def test_flower_evaluation_is_off_and_evaluation_replies_are_weighted_by_examples(  # type: ignore[no-untyped-def]
        flwr_identity) -> None:
    """The server evaluates the global state itself: the FedAvg evaluation that wrappers forward
    (DeadlineStrategy, Flower's DP wrapper) sends nothing, and would weight replies by examples."""
    strategy = _direct(2)
    assert list(strategy.configure_evaluate(1, ZERO100, ConfigRecord(), NodeIds(1, 2))) == []
    replies = [Message(RecordDict({"metrics": MetricRecord({wire.NUM_EXAMPLES: n, "accuracy": a})}),
                       reply_to=_instruction()) for n, a in ((10.0, 0.5), (30.0, 0.9))]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and dict(metrics) == {"accuracy": pytest.approx(0.8)}


def test_a_fresh_strategy_reports_round_zero(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    assert _direct(2).round_report() == adapter_avg.RoundReport(0)
