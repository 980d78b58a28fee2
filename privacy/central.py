"""Client-level central DP: Flower's fixed-clipping wrapper strategy plus its accountant.

Client-side DP-SGD (Opacus, :mod:`privacy.dpsgd`) protects *one training example of one
client*. Central DP protects *one client's whole contribution*: the server clips each
client's update (reply minus the global state it was sent) to L2 norm ``clip`` and adds
Gaussian noise of standard deviation ``noise_multiplier * clip / m`` to the average of the
``m`` sampled clients. fedpeft does this with Flower's own wrapper strategy
:class:`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` around the
:class:`~strategies.adapter_avg.AdapterAvg` (``run_federation(wrap_strategy=...)``), so the
two mechanisms compose: both can be on, and both epsilons are reported in every
``metrics.jsonl`` row with their units (``epsilon`` = example-level; ``epsilon_client_level``
= client-level).

Accounting. Flower's wrapper can account only around an unmodified ``FedAvg``, which
AdapterAvg is not; so :class:`ClientLevelAccountant` (a round hook) composes one event per
released aggregate into Flower's own ``RdpAccountant`` (Google's dp-accounting underneath),
with ``no-amplification`` sampling -- a valid upper bound whether or not clients are
subsampled. The event's noise multiplier is the *effective* one of that round:
``sigma / (m * w_max)`` where ``w_max`` is the largest aggregation weight (FedAvg weights by
examples), because one client moves the weighted mean by at most ``w_max * clip``. With equal
client sizes (``data.examples_per_client`` > 0) and all sampled clients accepted this is
exactly ``sigma``; weights are treated as public.

Assumption: the adapter's ``aggregate`` is a weighted mean of the client states (FFA-LoRA,
LoRA and the other mean-aggregating methods). Client-side clipping (Flower's
``DifferentialPrivacyClientSideFixedClipping``) needs ``fixedclipping_mod`` installed in the
ClientApp, which fedpeft's ClientApp does not do; that mode is refused with a clear error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - task.config imports this module
    from flwr.serverapp.strategy import Strategy

    from task.config import RunConfig

__all__ = ["CENTRAL_MODES", "CentralDPConfig", "ClientLevelAccountant", "validate_central", "with_central_dp"]

log = logging.getLogger("fedpeft.server")

CENTRAL_MODES = ("off", "server")
UNIT = "client-level (one client's whole update per round)"


@dataclass(frozen=True)
class CentralDPConfig:
    """Client-level central DP (``[central]``). ``mode = "server"``: Flower's server-side
    fixed-clipping wrapper; ``off``: none (the default)."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    clip: float = 1.0  # L2 norm bound of one client's update (reply - global state)
    delta: float = 1e-3  # client-level delta (population = clients, so far larger than DP-SGD's)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def validate_central(cfg: RunConfig) -> None:
    """One-line :class:`~task.config.ConfigError` for an invalid ``[central]`` table."""
    from task.config import ConfigError

    c = cfg.central
    if c.mode == "client":
        raise ConfigError("central.mode", c.mode, "client-side clipping needs Flower's fixedclipping_mod in the "
                                                  "ClientApp, which fedpeft does not install; use server")
    if c.mode not in CENTRAL_MODES:
        raise ConfigError("central.mode", c.mode, f"allowed: {', '.join(CENTRAL_MODES)}")
    if not (math.isfinite(c.noise_multiplier) and c.noise_multiplier > 0):
        raise ConfigError("central.noise_multiplier", c.noise_multiplier, "must be a positive number")
    if not (math.isfinite(c.clip) and c.clip > 0):
        raise ConfigError("central.clip", c.clip, "must be a positive number")
    if not 0 < c.delta < 1:
        raise ConfigError("central.delta", c.delta, "must be in (0, 1)")


class ClientLevelAccountant:
    """Round hook (duck-typed :class:`fl_server.loop.RoundHook`): composes one Gaussian event
    per released aggregate into Flower's ``RdpAccountant`` and writes the client-level epsilon
    into the round's metrics row."""

    def __init__(self, cfg: RunConfig) -> None:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.cfg = cfg
        self.sampled = cfg.train.clients_per_round or cfg.train.clients
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=cfg.central.delta, population_size=cfg.train.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))
        self.epsilon = 0.0

    def effective_noise_multiplier(self, weights: list[float]) -> float:
        """sigma / (m * w_max): the noise relative to one client's largest possible influence."""
        w_max = max(weights) / float(sum(weights))
        return self.cfg.central.noise_multiplier / (self.sampled * w_max)

    def on_start(self, setup: Any, strategy: Any, run_dir: Any) -> None:
        log.info("central DP: server-side clipping of client updates to %g, noise multiplier %g over %d "
                 "sampled clients; %s epsilon at delta=%g (RDP, Flower/dp-accounting, no amplification)",
                 self.cfg.central.clip, self.cfg.central.noise_multiplier, self.sampled, UNIT, self.cfg.central.delta)

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
            "epsilon_client_level_delta": self.cfg.central.delta,
            "epsilon_client_level_accountant": "rdp (flwr RdpAccountant, no amplification)",
            "central_noise_multiplier_effective": sigma_eff,
            "central_releases": self.accountant.num_releases,
        })

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        """Nothing to flush: every row already carries the epsilon so far."""


def with_central_dp(
    cfg: RunConfig, wrap_strategy: Callable[[Any], Strategy] | None = None,
) -> tuple[Callable[[Any], Strategy] | None, list[Any]]:
    """``(wrap_strategy, hooks)`` for ``run_federation``: unchanged when central DP is off;
    else the given wrapper (if any) wrapped once more in Flower's server-side fixed-clipping
    strategy, plus the :class:`ClientLevelAccountant` hook."""
    if not cfg.central.enabled:
        return wrap_strategy, []

    def wrap(base: Any) -> Strategy:
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

        inner = wrap_strategy(base) if wrap_strategy else base
        return DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=cfg.central.noise_multiplier, clipping_norm=cfg.central.clip,
            num_sampled_clients=cfg.train.clients_per_round or cfg.train.clients,
        )

    return wrap, [ClientLevelAccountant(cfg)]
