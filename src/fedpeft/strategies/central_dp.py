"""The server-side fixed-clipping wrapper fedpeft runs for client-level central DP.

:class:`CentralDPFixedClipping` is Flower's
:class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` (clip every
client update ``reply - global`` to L2 norm ``C``, let the inner strategy average, add
Gaussian noise of std ``sigma * C / m`` to the result) with three changes that the round loop
needs for the guarantee in :mod:`fedpeft.privacy.central` to hold:

* **Only the release is kept.** The inner :class:`~fedpeft.strategies.adapter_avg.AdapterAvg` is told
  (``release_sets_previous``) not to keep its clipped, *un-noised* aggregate as ``previous``;
  this wrapper sets ``previous`` to the *noised* state it returns. So the server's memory of
  the round, the next round's ``plugin.aggregate(..., previous)`` and ``checkpoint.npz`` all
  hold the released state and nothing from which the noise could be subtracted.
* **An error reply drops that client, not the round.** Flower's wrapper skips aggregation
  when any reply has an error; here it is recorded in the inner report's ``failed`` (as
  AdapterAvg does) and the other replies go on. ``m`` stays the ``num_sampled_clients`` the
  wrapper was built with (Flower's :func:`compute_stdv` divides by it), so the noise std does
  not shrink when clients drop; the accountant charges the larger per-client weight of the
  smaller set (``fedpeft.privacy.central.ClientLevelAccountant``).
* **Replies are matched to the global state by name before clipping.** Flower pairs reply and
  global arrays by position (``zip(..., strict=True)``): a reply with other shapes would raise
  and void the round, one in another key order would be clipped against the wrong tensors.
  A reply with the same names and shapes is put in the global order; any other ArrayRecord
  is rejected (``report.rejected``) unclipped, before it reaches the average.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedpeft.strategies.adapter_avg import AdapterAvg, _who

__all__ = ["CentralDPFixedClipping", "adapter_avg_of"]

log = logging.getLogger("fedpeft.server")


def adapter_avg_of(strategy: Strategy) -> AdapterAvg:
    """The :class:`AdapterAvg` inside Flower-style wrappers (each keeps its inner one as ``.strategy``)."""
    inner = strategy
    while not isinstance(inner, AdapterAvg):
        inner = inner.strategy  # type: ignore[attr-defined]
    return inner


class CentralDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping that keeps only the noised release, drops error
    replies instead of the round, and matches arrays by name (see the module doc)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.adapter_avg = adapter_avg_of(strategy)
        self.adapter_avg.release_sets_previous = True  # its un-noised aggregate is never kept

    def __repr__(self) -> str:
        return "fedpeft central DP (server-side fixed clipping, error replies dropped)"

    def _aligned(self, msg: Message) -> str:
        """Put each ArrayRecord of ``msg`` in the global state's key order; the reason it
        cannot be (other names or shapes), or "" when every record matches."""
        want = {k: tuple(v.shape) for k, v in self.current_arrays.items()}
        for name, record in list(msg.content.array_records.items()):
            got = {k: tuple(v.shape) for k, v in record.items()}
            if got != want:
                return "arrays do not match the global state's names and shapes (central DP clips per tensor)"
            msg.content[name] = ArrayRecord({k: record[k] for k in want})
        return ""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop error and mismatched replies (recorded in the inner report), clip and
        aggregate the rest with Flower's wrapper, and keep the noised result as ``previous``."""
        report = self.adapter_avg.report
        kept: list[Message] = []
        for msg in replies:
            node = _who(msg)
            if msg.has_error():
                report.failed[node] = str(msg.error.reason).strip().splitlines()[-1][:300]
                log.warning("round %d: %s failed: %s (dropped; central DP round goes on)", server_round, node,
                            report.failed[node])
                continue
            reason = self._aligned(msg)
            if reason:
                report.rejected[node] = reason
                log.warning("round %d: rejected reply from %s: %s", server_round, node, reason)
                continue
            kept.append(msg)
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is not None:  # the noised release: the only state the server keeps
            self.adapter_avg.previous = {k: v.numpy() for k, v in arrays.items()}
        return arrays, metrics
