"""The ClientApp that ``flwr run .`` and deployed SuperNodes load (pyproject's ``clientapp``).

Import-light on purpose (Flower, numpy and the standard library; no torch): Flower 1.42
starts a new ``flwr-clientapp`` process for every message and imports this module in it,
after the message arrived, so every import here is paid every round. A deployed node
(``data-path`` in its node config) hands the round to its warm worker
(:mod:`fedpeft.client.warm`), which keeps torch, the model and the data loaded between
rounds; ``warm-worker=false``, and any client without ``data-path`` (a simulated one),
trains in this process with :func:`fedpeft.client.app.train` (imported on first use).
Both paths run the same :func:`fedpeft.client.app.train`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.client.warm import forward, use_warm_worker

__all__ = ["app", "train"]


def train(msg: Message, context: Context) -> Message:
    """A round: in the node's warm worker, or here (module doc)."""
    if use_warm_worker(context.node_config):
        return forward(msg, context)  # type: ignore[no-any-return]
    from fedpeft.client.app import train as train_here

    return train_here(msg, context)


app = ClientApp()
app.train()(train)
