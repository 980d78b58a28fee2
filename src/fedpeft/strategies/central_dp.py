"""The server-side fixed-clipping wrapper fedpeft runs for client-level central DP.

:class:`CentralDPFixedClipping` is Flower's
:class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` (clip every
client update ``reply - global`` to L2 norm ``C``, let the inner strategy average, add
Gaussian noise of std ``sigma * C / m`` to the result) with four changes that the round loop
needs for the guarantee in :mod:`fedpeft.privacy.central` to hold:

* **Only the release is kept.** The inner :class:`~fedpeft.strategies.adapter_avg.AdapterAvg` is told
  (``defer_release``) not to keep its clipped, *un-noised* aggregate as ``previous``;
  this wrapper hands it the *noised* state it returns (``keep_release``). So the server's memory of
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
* **Fresh noise, never stored.** Flower draws the noise from numpy's process-global legacy
  generator (``np.random.normal``). fedpeft never seeds it, so in a fresh process it starts from
  OS entropy -- but it is shared by everything in the process: one ``np.random.seed(...)``
  anywhere (a library, a benchmark, a test) makes the noise reproducible by whoever knows that
  seed, and ``np.random.get_state()`` hands it to any code in the process. This wrapper draws
  from its own ``np.random.default_rng()`` instead, seeded by a fresh OS-entropy
  ``SeedSequence`` when the wrapper is built (once per server process); nothing derives it from
  the configuration, the run seed or the checkpoint, and :meth:`CentralDPFixedClipping.state_dict`
  is empty. So a round re-run after a resume draws fresh noise, and nothing in the run
  directory can regenerate a release's noise. (An interrupted round's release was never sent:
  it goes out with the next round's instructions, after the round's checkpoint; and the
  round loop writes the checkpoint before the round's ``metrics.jsonl`` row -- so re-drawing
  it is not a second release that the accountant would have to charge.)

The wrapper order of a run is in :mod:`fedpeft.strategies.registry` (central DP is outermost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import compute_stdv

from fedpeft.config import RunConfig
from fedpeft.privacy.central import ClientLevelAccountant, sampled_clients
from fedpeft.strategies.adapter_avg import AdapterAvg, _who
from fedpeft.strategies.state import StateDict, base_strategy

__all__ = ["CentralDPFixedClipping", "with_central_dp"]

log = logging.getLogger("fedpeft.server")


class CentralDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping that keeps only the noised release, drops error
    replies instead of the round, matches arrays by name and draws its noise from its own
    OS-entropy generator (see the module doc)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.adapter_avg = base_strategy(strategy, AdapterAvg)
        self.adapter_avg.defer_release()  # its un-noised aggregate is never kept
        self._noise = np.random.default_rng()  # fresh OS entropy; never derived from anything, never saved

    def __repr__(self) -> str:
        return "fedpeft central DP (server-side fixed clipping, error replies dropped)"

    def state_dict(self) -> StateDict:
        """Nothing: the noise generator is deliberately not part of any checkpoint (module doc)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"central DP wrapper state must be empty, got keys {sorted(state)}")

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's Gaussian noise of std ``sigma * clip / m``, from this wrapper's own generator."""
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = {}
        for name, value in aggregated_arrays.items():
            arr = value.numpy()
            noised[name] = Array(np.asarray(arr + self._noise.normal(0, stdv, arr.shape).astype(arr.dtype)))
        log.info("central DP noise with std %.4g added (fresh OS-entropy generator)", stdv)
        return ArrayRecord(noised)

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
        report = self.adapter_avg.round_report()
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
            self.adapter_avg.keep_release({k: v.numpy() for k, v in arrays.items()})
        return arrays, metrics


def with_central_dp(
    cfg: RunConfig, wrap_strategy: Callable[[Any], Strategy] | None = None,
) -> tuple[Callable[[Any], Strategy] | None, list[ClientLevelAccountant]]:
    """``(wrap, hooks)``: unchanged (``wrap_strategy``, no hooks) when central DP is off; else
    ``wrap_strategy`` (if any) wrapped once more in :class:`CentralDPFixedClipping`, plus the
    :class:`~fedpeft.privacy.central.ClientLevelAccountant` round hook that accounts it."""
    if not cfg.central.enabled:
        return wrap_strategy, []

    def wrap(base: Any) -> Strategy:
        inner = wrap_strategy(base) if wrap_strategy else base
        return CentralDPFixedClipping(inner, noise_multiplier=cfg.central.noise_multiplier,
                                      clipping_norm=cfg.central.clip, num_sampled_clients=sampled_clients(cfg))

    return wrap, [ClientLevelAccountant(cfg)]
