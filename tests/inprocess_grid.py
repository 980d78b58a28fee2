"""A Flower grid whose nodes are in this process: the real round loop without Ray or subprocesses.

``LocalGrid`` answers each pushed instruction by calling a real ClientApp (default: the
deployed :data:`fedpeft.client.app.app`; the simulator's :func:`fedpeft.sim.mods.simulation_app`
adds fault injection and device emulation) with that node's own ``Context``, kept across rounds
as a SuperNode keeps it. An exception the ClientApp raises becomes the error reply Flower's
simulation engine makes of it (``flwr/server/superlink/fleet/vce/vce_api.py``), so the server
sees what it would see in a simulation. Tests of the round loop (resume, retries, refusals) use
it with :func:`fedpeft.server.loop.run_federation`; :class:`Releases` is the round hook they use
to read every round's released global state. :class:`NodeIds` is the one Grid call a
strategy's ``configure_train`` makes, for tests that drive a strategy by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedpeft.server.loop import RoundHook

__all__ = ["LocalGrid", "NodeIds", "Releases"]


class NodeIds:
    """A grid that only lists its nodes (what ``configure_train`` asks of a grid)."""

    def __init__(self, *node_ids: int) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class Releases(RoundHook):
    """Keeps every round's released global state; raises after round ``crash_after`` (if set),
    as a server killed between rounds would stop."""

    def __init__(self, crash_after: int = 0) -> None:
        self.crash_after, self.setup = crash_after, None
        self.released: dict[int, dict[str, np.ndarray]] = {}

    def on_start(self, setup: Any, strategy: Any, run_dir: Any) -> None:
        self.setup = setup

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        self.released[server_round] = {k: v.copy() for k, v in self.setup.state.items()}  # type: ignore[union-attr]
        if server_round == self.crash_after:
            raise RuntimeError("server killed")


class LocalGrid:
    """``clients`` in-process nodes with IDs ``first_node, first_node + 1, ...`` (partition ids 0..n-1)."""

    pull_interval = 0.0  # replies are there as soon as they are pushed

    def __init__(self, clients: int, first_node: int = 1,
                 app: Callable[[Message, Context], Message] | None = None) -> None:
        if app is None:
            from fedpeft.client.app import app as deployed

            app = deployed
        self.app = app
        self.contexts = {first_node + pid: Context(run_id=1, node_id=first_node + pid, state=RecordDict(),
                                                   run_config={},
                                                   node_config={"partition-id": pid, "num-partitions": clients})
                         for pid in range(clients)}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []  # every instruction, in order

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _answer(self, msg: Message) -> Message:
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # as Flower's simulation engine reports a ClientApp's exception
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            self.sent.append(msg)
            reply = self._answer(msg)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
