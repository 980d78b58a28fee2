"""Client-level central DP: server-side fixed clipping of client updates plus its accountant.

Client-side DP-SGD (Opacus, :mod:`fedpeft.privacy.dpsgd`) protects *one training example of one
client*. Central DP protects *one client's whole contribution*: the server clips each
client's update (reply minus the global state it was sent) to L2 norm ``C = clip`` and adds
Gaussian noise of standard deviation ``sigma * C / m`` to the weighted mean of the accepted
clients' states, ``m`` being the configured number of sampled clients per round
(``train.clients_per_round``, or all). fedpeft runs this with
:class:`fedpeft.strategies.central_dp.CentralDPFixedClipping`, Flower's
``DifferentialPrivacyServerSideFixedClipping`` around the
:class:`~fedpeft.strategies.adapter_avg.AdapterAvg` (``fedpeft.strategies.registry``), so the
two mechanisms compose: both can be on, and both epsilons are reported in every
``metrics.jsonl`` row with their units (``epsilon`` = example-level; ``epsilon_client_level``
= client-level, with ``_unit``, ``_relation``, ``_delta`` and ``_accountant`` beside it).

Neighbouring relation: **client-level replace-one**. Two federations are neighbours if one
client's data, hence possibly its whole update, is replaced by anything; ``m``, which sampled
clients reply and are accepted, and their aggregation weights ``w_i`` (example counts,
normalised over the accepted ones) are public. The round's release is
``global + sum_i w_i * clip(u_i) + N(0, (sigma*C/m)^2 I)``; replacing client ``j`` moves the
mean by ``w_j * |clip(u_j) - clip(u_j')| <= 2 * w_max * C``. The *effective* noise multiplier
(noise std over that sensitivity) is therefore ``sigma / (2 * m * w_max)``: ``sigma / 2`` with
equal client sizes (``data.examples_per_client`` > 0) and all ``m`` accepted; larger ``w_max``
(unequal sizes, or clients that failed: the std stays ``sigma*C/m``) lowers it.

Accounting. Flower's wrapper can account only around an unmodified ``FedAvg``, which
AdapterAvg is not; so :class:`ClientLevelAccountant` (a round hook) composes one Gaussian
event per released aggregate into Flower's ``RdpAccountant`` (Google's dp-accounting
underneath) with ``no-amplification`` sampling -- a valid upper bound whether or not clients
are subsampled. That accountant offers replace-one only with sampling without replacement,
so the event is composed under add/remove with the effective multiplier above: for the
un-subsampled Gaussian mechanism the privacy curve depends only on std / sensitivity, so
replace-one with sensitivity ``2 * w_max * C`` *is* add/remove at ``sigma / (2 * m * w_max)``.

What it requires of the method: the released state must be the noised weighted mean itself,
so the adapter's ``aggregate`` must be a weighted mean of the client states and its
``server_step`` the identity (post-processing of the release is free; a re-SVD or a rank
step *before* the noise is not). Plugins declare it with ``central_dp_compatible``; any other
method is refused at config validation (:func:`fedpeft.load.validate`, which has the adapter
registry; the ``[central]`` table itself is :class:`fedpeft.config.CentralDPConfig`, range-checked
in :mod:`fedpeft.config.checks`). Not covered: the replies' metrics (example counts, training
loss) travel un-noised, as in Flower. Client-side clipping (Flower's
``DifferentialPrivacyClientSideFixedClipping``) needs ``fixedclipping_mod`` in the ClientApp,
which fedpeft's ClientApp does not install; that mode is refused with a clear error.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fedpeft.config import RunConfig

__all__ = ["RELATION", "ClientLevelAccountant", "sampled_clients"]

log = logging.getLogger("fedpeft.server")

UNIT = "client-level (one client's whole update per round)"
RELATION = ("replace-one (one client's whole update replaced; m, participation and weights public; "
            "sensitivity 2*w_max*clip)")
ACCOUNTANT = "rdp (flwr RdpAccountant, no amplification; replace-one as add/remove at sigma/(2*m*w_max))"


def sampled_clients(cfg: RunConfig) -> int:
    """``m``: the clients sampled per round, which the noise std ``sigma * clip / m`` divides by."""
    return cfg.train.clients_per_round or cfg.train.clients


class ClientLevelAccountant:
    """Round hook (duck-typed :class:`fedpeft.server.loop.RoundHook`): composes one Gaussian event
    per released aggregate into Flower's ``RdpAccountant`` -- replace-one, as add/remove at the
    effective multiplier ``sigma / (2 * m * w_max)`` (module doc) -- and writes the client-level
    epsilon with its unit, relation, delta and accountant into the round's metrics row."""

    def __init__(self, cfg: RunConfig) -> None:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.cfg = cfg
        self.sampled = sampled_clients(cfg)
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=cfg.central.delta, population_size=cfg.train.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))
        self.epsilon = 0.0

    def effective_noise_multiplier(self, weights: list[float]) -> float:
        """sigma / (2 * m * w_max): the noise std ``sigma*clip/m`` over the replace-one
        sensitivity ``2 * w_max * clip`` of the weighted mean of the accepted clients."""
        w_max = max(weights) / float(sum(weights))
        return self.cfg.central.noise_multiplier / (2 * self.sampled * w_max)

    def on_start(self, setup: Any, strategy: Any, run_dir: Any) -> None:
        log.info("central DP: server-side clipping of client updates to %g, noise multiplier %g over %d "
                 "sampled clients; %s epsilon, relation %s, at delta=%g, accountant %s",
                 self.cfg.central.clip, self.cfg.central.noise_multiplier, self.sampled, UNIT, RELATION,
                 self.cfg.central.delta, ACCOUNTANT)

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        sigma_eff = math.nan
        if report.released:  # the wrapper released a noised aggregate this round
            sigma_eff = self.effective_noise_multiplier([r.weight for r in report.accepted])
            self.accountant.compose(GaussianPrivacyEvent(
                noise_multiplier=sigma_eff, sample_size=self.sampled, population_size=self.cfg.train.clients))
            self.epsilon = float(self.accountant.get_privacy_spent().epsilon)
        row.update({
            "epsilon_client_level": self.epsilon,
            "epsilon_client_level_unit": UNIT,
            "epsilon_client_level_relation": RELATION,
            "epsilon_client_level_delta": self.cfg.central.delta,
            "epsilon_client_level_accountant": ACCOUNTANT,
            "central_noise_multiplier_effective": sigma_eff,
            "central_releases": self.accountant.num_releases,
        })

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        """Nothing to flush: every row already carries the epsilon so far."""

    def state_dict(self) -> dict[str, Any]:
        """The composed releases (Flower's accountant state: its configuration and events) and
        the epsilon so far, so a resumed run goes on accounting where the checkpoint stopped."""
        return {"accountant": self.accountant.state_dict(), "epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError if it was made under another
        client-level privacy configuration (delta, population, relation, sampling)."""
        self.accountant.load_state_dict(dict(state["accountant"]))
        self.epsilon = float(state["epsilon"])
