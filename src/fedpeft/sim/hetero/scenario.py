"""Scenarios: which devices a federation has, and how its server treats stragglers.

A scenario is a TOML file (shipped ones live in ``scenarios/``; ``--scenario NAME|PATH``)::

    name = "hetero-mixed"
    description = "..."
    host_profile = "Host-2core-CPU"   # the machine the server prices a step on (its cost is scaled)
    profiles_file = ""                # extra/overriding profiles (path, relative to the file)
    rank_tiers = [8, 4, 2]            # lower ranks a client may fall back to (memory)

    [config]          # a run-configuration layer, same keys as `fedpeft simulate --config`
    train.rounds = 3

    [clients]         # exact counts per profile (they must sum to train.clients) ...
    "A100-80GB" = 1
    [distribution]    # ... or fractions per profile, assigned by a seeded draw
    [ranks]           # rank tier per profile (default: adapter.rank)
    [deadline]        # policy = wait-all | drop-late | over-select; seconds; over_select
    [profiles.NAME]   # inline profile overrides / additions

Assignment is a pure function of (scenario, seed): counts are laid out and shuffled with
the run seed; a distribution draws each client's profile with the same seed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import ConfigError
from fedpeft.sim.hetero.profiles import DeviceProfile, load_catalogue
from fedpeft.strategies.deadlines import DeadlinePolicy

__all__ = ["SCENARIO_DIR", "Scenario", "load_scenario", "scenario_names"]

SCENARIO_DIR = Path(__file__).with_name("scenarios")
_TOP = {"name", "description", "host_profile", "profiles_file", "rank_tiers", "config", "clients", "distribution",
        "ranks", "deadline", "profiles"}


@dataclass(frozen=True)
class Scenario:
    """A parsed, validated scenario (the run configuration layer is kept raw)."""

    name: str
    description: str
    config: dict[str, Any]
    catalogue: dict[str, DeviceProfile]
    host_profile: str
    counts: dict[str, int] = field(default_factory=dict)
    distribution: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    rank_tiers: tuple[int, ...] = ()
    deadline: DeadlinePolicy = field(default_factory=DeadlinePolicy)
    path: str = ""

    @property
    def host(self) -> DeviceProfile:
        return self.catalogue[self.host_profile]

    def profiles_used(self) -> list[str]:
        return list(self.counts or self.distribution)

    def assign(self, clients: int, seed: int) -> list[str]:
        """The profile name of every client id 0..clients-1 (deterministic in ``seed``)."""
        rng = np.random.default_rng([seed, 0xDE71CE])
        if self.counts:
            total = sum(self.counts.values())
            if total != clients:
                raise ConfigError("clients", total, f"profile counts must sum to train.clients = {clients}")
            names = [n for n, c in self.counts.items() for _ in range(c)]
            return [names[i] for i in rng.permutation(len(names))]
        names = list(self.distribution)
        p = np.asarray([self.distribution[n] for n in names], dtype=float)
        picks = rng.choice(len(names), size=clients, p=p / p.sum())
        return [names[i] for i in picks]


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def _resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError("scenario", name_or_path, "file not found")
        return p
    shipped = SCENARIO_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ConfigError("scenario", name_or_path, f"unknown; shipped: {', '.join(scenario_names())}, or a .toml path")
    return shipped


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "expected a number")
    return float(value)


def load_scenario(name_or_path: str, profiles_file: str = "") -> Scenario:
    """Read and validate a shipped scenario by name, or a scenario TOML file."""
    path = _resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("scenario", str(path), f"not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"scenario.{unknown[0]}", raw[unknown[0]], f"unknown key; allowed: {', '.join(sorted(_TOP))}")
    extra = [str((path.parent / raw["profiles_file"]).resolve())] if raw.get("profiles_file") else []
    if profiles_file:
        extra.append(profiles_file)
    catalogue = load_catalogue(*extra, extra_tables=raw.get("profiles") or None)
    known = ", ".join(sorted(catalogue))

    def check_names(table: str, names: Any) -> None:
        for n in names:
            if n not in catalogue:
                raise ConfigError(f"{table}.{n}", n, f"unknown profile; known: {known}")

    counts = {str(k): v for k, v in (raw.get("clients") or {}).items()}
    dist = {str(k): v for k, v in (raw.get("distribution") or {}).items()}
    if bool(counts) == bool(dist):
        raise ConfigError("scenario", str(path), "needs exactly one of [clients] (counts) or [distribution] (fractions)")
    check_names("clients", counts)
    check_names("distribution", dist)
    for k, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"clients.{k}", v, "expected a count >= 0")
    fractions = {k: _number(f"distribution.{k}", v) for k, v in dist.items()}
    if fractions and (any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0):
        raise ConfigError("distribution", dist, "fractions must be >= 0 with a positive sum")
    ranks = {str(k): v for k, v in (raw.get("ranks") or {}).items()}
    check_names("ranks", ranks)
    for k, v in ranks.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
            raise ConfigError(f"ranks.{k}", v, "expected an integer rank in [1, 1024]")
    tiers = raw.get("rank_tiers", [])
    if not isinstance(tiers, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiers):
        raise ConfigError("rank_tiers", tiers, "expected a list of positive integer ranks")
    dl_raw = dict(raw.get("deadline") or {})
    bad = sorted(set(dl_raw) - {"policy", "seconds", "over_select"})
    if bad:
        raise ConfigError(f"deadline.{bad[0]}", dl_raw[bad[0]], "unknown key; allowed: over_select, policy, seconds")
    deadline = DeadlinePolicy(
        policy=str(dl_raw.get("policy", "wait-all")),
        deadline_s=_number("deadline.seconds", dl_raw.get("seconds", math.inf)),
        over_select=_number("deadline.over_select", dl_raw.get("over_select", 1.0)),
    )
    deadline.validate()
    host = str(raw.get("host_profile", "Host-2core-CPU"))
    check_names("host_profile", [host])
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError("scenario.config", config, "must be a table of run-configuration keys")
    return Scenario(
        name=str(raw.get("name", path.stem)), description=str(raw.get("description", "")), config=config,
        catalogue=catalogue, host_profile=host, counts=counts, distribution=fractions, ranks=ranks,
        rank_tiers=tuple(tiers), deadline=deadline, path=str(path),
    )
