"""AdapterAvg with a server optimiser: ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``.

:class:`ServerOptAvg` is :class:`~fedpeft.strategies.adapter_avg.AdapterAvg` (sampling,
per-reply validation, the adapter plugin's aggregation rule) whose aggregate is not the new
global state itself but the target of a server optimiser step
(:mod:`fedpeft.strategies.server_opt`): ``plugin.aggregate`` -> optimiser step from the state
the round sent out -> ``plugin.server_step``. One subclass per registered name, so a checkpoint's
strategy chain names the rule and a run resumed with another one is refused
(:func:`fedpeft.strategies.state.load_chain_state_dict`).

State: AdapterAvg's (released state, sampler RNG) plus the optimiser's moments, so a resumed
run continues bit-identically. The state sent out (``x``) is not saved: the round loop sends
the checkpoint's global state again, and :meth:`configure_train` keeps it.

Single-task federations only: for a multi-task one these names are a one-line config error
(the per-group aggregation keeps an absent task's tensors, which momentum would still move).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedpeft.adapters.base import AdapterPlugin, NDArrays
from fedpeft.config import RunConfig
from fedpeft.strategies.adapter_avg import AdapterAvg, log
from fedpeft.strategies.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
)
from fedpeft.strategies.state import StateDict
from fedpeft.strategies.validation import StateSpec

__all__ = ["AdapterFedAdagrad", "AdapterFedAdam", "AdapterFedAvgM", "AdapterFedYogi", "SERVER_OPT_STRATEGIES",
           "ServerOptAvg"]


class ServerOptAvg(AdapterAvg):
    """AdapterAvg whose new global state is ``optimizer``'s step towards the aggregate
    (module doc); ``optimizer`` is given (primitives) or built from the run configuration
    (:meth:`from_config`, by :attr:`rule`)."""

    rule: ClassVar[type[ServerOptimizer]]
    central_dp_compatible: ClassVar[bool] = False  # its moments would hold un-noised aggregates

    def __init__(self, plugin: AdapterPlugin, spec: StateSpec, *, optimizer: ServerOptimizer,
                 **kwargs: Any) -> None:
        super().__init__(plugin, spec, **kwargs)
        self.optimizer = optimizer
        self.current: NDArrays = {}

    @classmethod
    def config_primitives(cls, cfg: RunConfig) -> dict[str, Any]:
        """The rule's optimiser with ``cfg.strategy``'s options (AdapterAvg's ``from_config`` adds the rest)."""
        return {"optimizer": cls.rule(cfg.strategy)}

    def summary(self) -> None:
        super().summary()
        opts = ", ".join(f"{k}={getattr(self.optimizer.cfg, k)}" for k in self.optimizer.options())
        log.info("server optimiser %s (%s): %s", self.optimizer.name, opts, self.optimizer.formula)

    def state_dict(self) -> StateDict:
        """AdapterAvg's state plus the optimiser's (its moments)."""
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state.get("optimizer"), Mapping):
            raise ValueError(f"{type(self).__name__} state: no server optimiser state")
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the state sent out (``x``, the optimiser's starting point), then AdapterAvg's."""
        self.current = {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_states(self, states: list[NDArrays], weights: list[float]) -> NDArrays:
        """The plugin's aggregate, then the optimiser's step from the state sent out."""
        if not self.current:
            raise RuntimeError(f"{type(self).__name__}: aggregate before configure_train (no state sent out)")
        return self.optimizer.step(self.current, super().aggregate_states(states, weights))


class AdapterFedAvgM(ServerOptAvg):
    """``fedavgm``: server momentum (:class:`~fedpeft.strategies.server_opt.FedAvgM`)."""

    rule = FedAvgM


class AdapterFedAdagrad(ServerOptAvg):
    """``fedadagrad`` (:class:`~fedpeft.strategies.server_opt.FedAdagrad`)."""

    rule = FedAdagrad


class AdapterFedAdam(ServerOptAvg):
    """``fedadam`` (:class:`~fedpeft.strategies.server_opt.FedAdam`)."""

    rule = FedAdam


class AdapterFedYogi(ServerOptAvg):
    """``fedyogi`` (:class:`~fedpeft.strategies.server_opt.FedYogi`)."""

    rule = FedYogi


SERVER_OPT_STRATEGIES: dict[str, type[ServerOptAvg]] = {
    c.rule.name: c for c in (AdapterFedAvgM, AdapterFedAdagrad, AdapterFedAdam, AdapterFedYogi)}
"""``strategy.name`` -> base strategy, for :mod:`fedpeft.strategies.registry`."""
