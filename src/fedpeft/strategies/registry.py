"""The strategy registry, and the one place where a run's wrapper strategies are applied.

``[strategy] name`` picks the base strategy (:data:`STRATEGIES`; an unknown name is a one-line
config error listing these). ``fedavg`` is :class:`~fedpeft.strategies.adapter_avg.AdapterAvg`:
Flower's FedAvg sampling, per-reply validation and the adapter plugin's aggregation rule; a
multi-task federation (its server's spec is a per-task
:class:`~fedpeft.strategies.multitask_avg.MultiTaskSpec`) gets the per-task variant
:class:`~fedpeft.strategies.multitask_avg.MultiTaskAvg`. ``fedavgm``, ``fedadagrad``, ``fedadam``
and ``fedyogi`` are AdapterAvg with a server optimiser
(:mod:`fedpeft.strategies.server_opt_avg`; the rules in :mod:`fedpeft.strategies.server_opt`),
for single-task federations; their options are ``[strategy]`` keys (:func:`describe`).

:func:`build_strategy` wraps the base, Flower style (each wrapper keeps the one inside as
``.strategy``), in this order, innermost first:

1. :class:`~fedpeft.strategies.deadlines.DeadlineStrategy`, when a round timer is given (a
   simulation of heterogeneous devices). Innermost because it decides which replies exist at
   all: a late or crashed client's reply is as if it never came, so nothing outside it sees
   a reply the server would not have had in time.
2. The caller's own wrapper (``extra``: a test's message spy, a benchmark's probe).
3. :class:`~fedpeft.strategies.central_dp.CentralDPFixedClipping`, when ``[central] mode =
   server``. Outermost because its noise must be the last thing done to the aggregate: what it
   returns is the round's release, which every strategy inside keeps and the checkpoint stores.

Every part of the chain checkpoints its own state (:mod:`fedpeft.strategies.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.config import STRATEGY_DEFAULTS, STRATEGY_OPTIONS, ConfigError, RunConfig, StrategyConfig
from fedpeft.privacy.central import ClientLevelAccountant
from fedpeft.strategies.adapter_avg import AdapterAvg
from fedpeft.strategies.central_dp import with_central_dp
from fedpeft.strategies.deadlines import DeadlineStrategy, RoundTimer
from fedpeft.strategies.multitask_avg import MultiTaskAvg, MultiTaskSpec
from fedpeft.strategies.server_opt_avg import SERVER_OPT_STRATEGIES, ServerOptAvg
from fedpeft.strategies.validation import StateSpec

__all__ = ["MULTITASK_STRATEGIES", "STRATEGIES", "build_base", "build_strategy", "check_central_dp", "describe",
           "names", "register", "strategy_class"]

STRATEGIES: dict[str, type[AdapterAvg]] = {"fedavg": AdapterAvg, **SERVER_OPT_STRATEGIES}
"""``strategy.name`` -> base strategy of a single-task run (:func:`register` adds one)."""

MULTITASK_STRATEGIES: dict[str, type[AdapterAvg]] = {"fedavg": MultiTaskAvg}
"""The same names for a multi-task federation (per-task reply specs and grouped aggregation)."""


def register(name: str, single: type[AdapterAvg], multitask: type[AdapterAvg] | None = None) -> type[AdapterAvg]:
    """Add a base strategy under ``name`` (``strategy.name = NAME``); ``multitask``, if given,
    serves multi-task federations (else such a run with this name is a one-line error).
    A second strategy with one name is refused."""
    if not name or name in STRATEGIES:
        raise ValueError(f"strategy name {name!r} is empty or already registered")
    STRATEGIES[name] = single
    if multitask is not None:
        MULTITASK_STRATEGIES[name] = multitask
    return single


def names() -> list[str]:
    """Registered base strategy names, in registration order."""
    return list(STRATEGIES)


def strategy_class(name: str) -> type[AdapterAvg]:
    """The single-task base strategy registered as ``name`` (KeyError if none): its class
    attributes are the strategy's declared capabilities (``central_dp_compatible``)."""
    return STRATEGIES[name]


def check_central_dp(cfg: RunConfig, strategy: type[AdapterAvg], plugin: AdapterPlugin) -> None:
    """Refuse client-level central DP (``central.mode = server``) unless both the base strategy
    and the adapter plugin declare ``central_dp_compatible``: the noise is added to the base
    strategy's weighted mean, so a strategy with its own state (a server optimiser's moments)
    would keep un-noised aggregates, and a plugin whose aggregate is not a weighted mean with an
    identity ``server_step`` would not have one client's influence bounded by the clip.
    Called by :func:`fedpeft.load.validate` and again by :func:`build_strategy` (a strategy
    chain built without validation must not get past it either)."""
    if not cfg.central.enabled:
        return
    if not strategy.central_dp_compatible:
        allowed = [n for n, c in STRATEGIES.items() if c.central_dp_compatible]
        raise ConfigError("strategy.name", cfg.strategy.name, "client-level central DP (central.mode = server) adds "
                          "its noise after the base strategy, so this strategy's state would hold un-noised "
                          f"aggregates; allowed with central DP: {', '.join(allowed)}")
    if not plugin.central_dp_compatible:
        raise ConfigError("central.mode", cfg.central.mode, f"{cfg.adapter.method} cannot run with client-level "
                          "central DP: its aggregation is not a weighted mean of client states with an identity "
                          "server_step, so clip + noise on the mean would not bound one client's influence; use off")


def describe(name: str) -> str:
    """One entry of ``fedpeft strategies``: the name, what it does and its options with the
    defaults it runs with (the schema's, under the name's own)."""
    cls = STRATEGIES[name]
    if issubclass(cls, ServerOptAvg):
        what = f"AdapterAvg + server optimiser: {cls.rule.formula}"
    elif cls is AdapterAvg:
        what = "AdapterAvg: the adapter plugin's aggregate is the new global state (FedAvg)"
    else:  # registered at run time: its docstring's first line
        what = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    base = StrategyConfig()
    defaults = {**{k: getattr(base, k) for k in STRATEGY_OPTIONS.get(name, ())}, **STRATEGY_DEFAULTS.get(name, {})}
    opts = ", ".join(f"strategy.{k}={v}" for k, v in defaults.items()) or "none"
    scope = "single- and multi-task" if name in MULTITASK_STRATEGIES else "single-task only"
    return f"{name:<11} {what}\n            options: {opts}; {scope}"


def build_base(
    cfg: RunConfig, plugin: AdapterPlugin, spec: StateSpec, config_toml: str, config_hash: str,
    extra_config: Mapping[str, str] | None = None, clients_per_round: int = 0,
) -> AdapterAvg:
    """The base strategy ``cfg.strategy.name`` names, its multi-task variant for a per-task
    ``spec`` (``clients_per_round``: 0 = the config's)."""
    table = MULTITASK_STRATEGIES if isinstance(spec, MultiTaskSpec) else STRATEGIES
    if cfg.strategy.name not in table:
        where = " for a multi-task federation" if table is MULTITASK_STRATEGIES else ""
        raise ConfigError("strategy.name", cfg.strategy.name, f"allowed{where}: {', '.join(table)}")
    return table[cfg.strategy.name].from_config(plugin, cfg, spec, config_toml, config_hash, extra_config,
                                                clients_per_round=clients_per_round)


def build_strategy(
    cfg: RunConfig, plugin: AdapterPlugin, spec: StateSpec, config_toml: str, config_hash: str,
    extra_config: Mapping[str, str] | None = None, *, round_timer: RoundTimer | None = None,
    extra: Callable[[Strategy], Strategy] | None = None,
) -> tuple[Strategy, list[ClientLevelAccountant]]:
    """The run's strategy chain (module doc for the order) and the round hooks its wrappers
    need (central DP: the client-level accountant)."""
    wanted = cfg.train.clients_per_round or cfg.train.clients
    selected = round_timer.policy.selection(wanted, cfg.train.clients) if round_timer is not None else wanted
    base = build_base(cfg, plugin, spec, config_toml, config_hash, extra_config, selected)
    check_central_dp(cfg, type(base), plugin)
    strategy: Strategy = base
    if round_timer is not None:
        strategy = DeadlineStrategy(strategy, round_timer.policy, wanted, round_timer)
    if extra is not None:
        strategy = extra(strategy)
    central, hooks = with_central_dp(cfg)
    if central is not None:
        strategy = central(strategy)
    return strategy, hooks
