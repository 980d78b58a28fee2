"""A Flower grid whose nodes are in this process: the real round loop without Ray or subprocesses.

``LocalGrid`` answers each pushed instruction by calling a real ClientApp (default: the
deployed :data:`fedpeft.client.app.app`; the simulator's :func:`fedpeft.sim.mods.simulation_app`
adds fault injection and device emulation) with that node's own ``Context``, kept across rounds
as a SuperNode keeps it. An exception the ClientApp raises becomes the error reply Flower's
simulation engine makes of it (``flwr/server/superlink/fleet/vce/vce_api.py``), so the server
sees what it would see in a simulation. Tests of the round loop (resume, retries, refusals) use
it with :func:`fedpeft.server.loop.run_federation`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

__all__ = ["LocalGrid"]


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
