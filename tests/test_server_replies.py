"""The server's send/receive step (fedpeft.server.loop.send_and_receive) on a fake grid.

Regression: when a deployed node went offline mid-round, the SuperLink answered its
instruction with an error reply whose sender is the SuperLink itself (node ID 1), and the
server logged and recorded ``node-1 failed`` -- a node that did not fail (or does not
exist). Error replies are now attributed to the node the instruction went to.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedpeft.load import parse_config
from fedpeft.server.loop import attribute_reply, send_and_receive
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import StateSpec

SPEC = StateSpec({"w": ((4, 4), "float32")}, frozen_hash="h")
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
