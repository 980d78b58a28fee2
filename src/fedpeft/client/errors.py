"""The client's one error type whose text may reach the server (import-light: no torch).

Kept apart from :mod:`fedpeft.client.runtime` so that the deployed node's thin ClientApp
(:mod:`fedpeft.client.node_app`) can raise it without importing the training stack.
"""

from __future__ import annotations

__all__ = ["NodeRefusal"]


class NodeRefusal(RuntimeError):
    """A failure whose text is safe to send to the server (it names no data: no labels,
    columns, file contents or paths). Every other exception is logged on the node and
    answered with a generic text (``fedpeft.client.app.train``)."""
