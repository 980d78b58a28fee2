"""Value ranges and cross-field constraints of a :class:`~fedpeft.config.schema.RunConfig`
that need neither the adapter registry nor the file system.

:func:`check_config` runs on every parse (:func:`fedpeft.config.parse.build_config`), on the
server and on every node alike. What needs more -- that ``adapter.method`` is registered and
accepts the configuration, that central DP suits the method, that files exist where this
process reads them -- is checked above, by :mod:`fedpeft.load`.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.config.schema import (
    ACCOUNTANTS,
    ADD_REMOVE_ACCOUNTANTS,
    CENTRAL_MODES,
    DEVICES,
    DTYPES,
    FAULT_POLICIES,
    OPTIMIZERS,
    PARTITIONS,
    POOLINGS,
    STRATEGY_OPTIONS,
    ConfigError,
    RunConfig,
    StrategyConfig,
)
from fedpeft.config.tasks import check_tasks

__all__ = ["check_central", "check_config", "check_faults", "check_strategy", "require"]


def require(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError(key, value, allowed)`` unless ``cond``."""
    if not cond:
        raise ConfigError(key, value, allowed)


def check_config(cfg: RunConfig) -> None:
    """Every registry-free, file-free check, section by section (one-line ConfigError)."""
    _check_model_data(cfg)
    _check_adapter_privacy(cfg)
    _check_train(cfg)
    check_central(cfg)
    check_faults(cfg)
    check_strategy(cfg)
    check_tasks(cfg)


def _check_model_data(cfg: RunConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    require(m.max_length >= 8, "model.max_length", m.max_length, "must be >= 8")
    require(m.max_length <= 4096, "model.max_length", m.max_length, "must be <= 4096")
    require(m.pooling in POOLINGS, "model.pooling", m.pooling, f"allowed: {', '.join(POOLINGS)}")
    require(m.dtype in DTYPES, "model.dtype", m.dtype, f"allowed: {', '.join(DTYPES)}")
    require(1 <= m.max_new_tokens <= 4096, "model.max_new_tokens", m.max_new_tokens, "must be in [1, 4096]")
    require(d.test_size == 0 or d.test_size >= 10, "data.test_size", d.test_size,
            "must be >= 10, or 0 (auto: 20 % of the data, at most 1000)")
    require(d.validation_size == 0 or d.validation_size >= 10, "data.validation_size", d.validation_size,
            "must be >= 10, or 0 (no validation split)")
    require(d.evaluate_on in ("test", "validation"), "data.evaluate_on", d.evaluate_on, "allowed: test, validation")
    require(d.evaluate_on == "test" or d.validation_size > 0, "data.evaluate_on", d.evaluate_on,
            "validation needs data.validation_size > 0")
    require(d.split_seed >= -1, "data.split_seed", d.split_seed, "must be >= 0, or -1 (the run's seed)")
    require(d.examples_per_client >= 0, "data.examples_per_client", d.examples_per_client, "must be >= 0 (0 = all)")
    require(d.partition in PARTITIONS, "data.partition", d.partition, f"allowed: {', '.join(PARTITIONS)}")
    require(d.dirichlet_alpha > 0 and math.isfinite(d.dirichlet_alpha), "data.dirichlet_alpha", d.dirichlet_alpha,
            "must be > 0")
    if d.partition == "label-proportions":
        require(
            len(d.label_proportions) == t.clients,
            "data.label_proportions", len(d.label_proportions),
            f"needs one row per client ({t.clients} rows) when partition=label-proportions",
        )


def _check_adapter_privacy(cfg: RunConfig) -> None:
    a, p = cfg.adapter, cfg.privacy
    require(1 <= a.rank <= 1024, "adapter.rank", a.rank, "must be an integer in [1, 1024]")
    require(a.alpha > 0 and math.isfinite(a.alpha), "adapter.alpha", a.alpha, "must be > 0")
    require(a.seed >= 0, "adapter.seed", a.seed, "must be >= 0")
    require(p.epsilon > 0, "privacy.epsilon", p.epsilon, "must be > 0 (or inf for no DP)")
    require(0 < p.delta < 1, "privacy.delta", p.delta, "must be in (0, 1)")
    require(p.clip > 0 and math.isfinite(p.clip), "privacy.clip", p.clip, "must be > 0")
    require(p.accountant not in ADD_REMOVE_ACCOUNTANTS, "privacy.accountant", p.accountant,
            "prv and rdp account add/remove neighbours, but fedpeft releases each client's example count "
            "(replace-one); allowed: pld")
    require(p.accountant in ACCOUNTANTS, "privacy.accountant", p.accountant, f"allowed: {', '.join(ACCOUNTANTS)}")


def _check_train(cfg: RunConfig) -> None:
    t = cfg.train
    require(1 <= t.rounds <= 100_000, "train.rounds", t.rounds, "must be an integer in [1, 100000]")
    require(1 <= t.clients <= 100_000, "train.clients", t.clients, "must be an integer in [1, 100000]")
    # Upper bounds keep a typo from becoming an unbounded run (and a privacy plan whose
    # accountant grid would not fit in memory).
    require(0 < t.local_epochs <= 1_000, "train.local_epochs", t.local_epochs, "must be in (0, 1000]")
    require(0 <= t.local_steps <= 100_000, "train.local_steps", t.local_steps,
            "must be an integer in [0, 100000] (0 = use local_epochs)")
    require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    require(t.physical_batch_size >= 1, "train.physical_batch_size", t.physical_batch_size, "must be >= 1")
    require(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be > 0")
    require(t.proximal_mu >= 0 and math.isfinite(t.proximal_mu), "train.proximal_mu", t.proximal_mu,
            "must be >= 0 (FedProx's mu; 0 = off)")
    require(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"allowed: {', '.join(OPTIMIZERS)}")
    require(0 <= t.clients_per_round <= t.clients, "train.clients_per_round", t.clients_per_round,
            f"must be in [0, {t.clients}] (0 = all)")
    require(cfg.device in DEVICES, "device", cfg.device, f"allowed: {', '.join(DEVICES)}")
    require(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")


def check_central(cfg: RunConfig) -> None:
    """One-line ConfigError for an invalid ``[central]`` table. Whether the method's release
    suits central DP needs the registry: :func:`fedpeft.load.validate`."""
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


def check_strategy(cfg: RunConfig) -> None:
    """One-line ConfigError for a ``[strategy]`` option out of range, or set away from its
    default for a strategy that does not read it (:data:`~fedpeft.config.schema.STRATEGY_OPTIONS`).
    Whether the name is registered, and may run with client-level central DP, needs the
    registry: :func:`fedpeft.load.validate`."""
    s = cfg.strategy
    require(math.isfinite(s.server_lr) and s.server_lr > 0, "strategy.server_lr", s.server_lr, "must be > 0")
    require(0.0 <= s.momentum < 1.0, "strategy.momentum", s.momentum, "must be in [0, 1)")
    require(0.0 <= s.beta_1 < 1.0, "strategy.beta_1", s.beta_1, "must be in [0, 1)")
    require(0.0 <= s.beta_2 < 1.0, "strategy.beta_2", s.beta_2, "must be in [0, 1)")
    require(math.isfinite(s.tau) and s.tau > 0, "strategy.tau", s.tau, "must be > 0")
    used = STRATEGY_OPTIONS.get(s.name)
    if used is None:
        return
    base = StrategyConfig()
    for key in ("server_lr", "momentum", "beta_1", "beta_2", "tau"):
        if key not in used and getattr(s, key) != getattr(base, key):
            raise ConfigError(f"strategy.{key}", getattr(s, key), f"{s.name} does not read it; its options: "
                                                                   f"{', '.join(used) or 'none'}")


def check_faults(cfg: RunConfig) -> None:
    """One-line ConfigError for an invalid ``[faults]`` table."""
    f = cfg.faults
    if not (math.isfinite(f.fail_rate) and 0.0 <= f.fail_rate < 1.0):
        raise ConfigError("faults.fail_rate", f.fail_rate, "must be a probability in [0, 1)")
    per_round = cfg.train.clients_per_round or cfg.train.clients
    if not 0 <= f.min_clients <= per_round:
        raise ConfigError("faults.min_clients", f.min_clients,
                          f"must be in [0, {per_round}] (clients per round; 0 = 1)")
    if f.on_too_few not in FAULT_POLICIES:
        raise ConfigError("faults.on_too_few", f.on_too_few, f"allowed: {', '.join(FAULT_POLICIES)}")
    if not 0 <= f.max_retries <= 100:
        raise ConfigError("faults.max_retries", f.max_retries, "must be an integer in [0, 100]")
