"""The ``[tasks]`` configuration section: which tasks a multi-task federation runs.

A multi-task federation gives every client exactly one task; each task has its own data
and held-out test split (and, for classification, its own label set and head). Tasks are
named either from the task type's shipped ones (``--tasks rt,bbc,tweets``; for
``task_type = "causal-lm"`` the instruction tasks rt, bbc, tweets, trivia, chat) or by a table
per task (for causal-lm a prompt/response file, ``label_column`` naming its strata column)::

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

This module parses the table (:func:`parse_tasks`) and checks what needs no file system
(:func:`check_tasks`); whether a task's file exists is checked by :mod:`fedpeft.load` on the
server, which reads the files. The resolved section serialises to TOML as ``names`` plus an
array of ``specs`` tables and parses back to the same value.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from fedpeft.config.coerce import coerce
from fedpeft.config.schema import (
    SHIPPED_TASKS,
    SHIPPED_TASKS_BY_TYPE,
    TASK_PARTITIONS,
    ConfigError,
    RunConfig,
    TasksConfig,
    TaskSpec,
)

__all__ = ["SHIPPED_TASKS", "SHIPPED_TASKS_BY_TYPE", "TASK_PARTITIONS", "TaskSpec", "TasksConfig", "check_tasks", "parse_tasks"]

_NAME = re.compile(r"^[A-Za-z0-9_]{1,40}$")


def parse_tasks(raw: dict[str, Any]) -> TasksConfig:
    """Build from a ``[tasks]`` table: scalar keys, ``names`` (list or "a,b"), ``specs``
    (the serialised form) and one sub-table per task (the user form)."""
    known = {f.name for f in fields(TasksConfig)} - {"specs"}
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
                raise ConfigError(full, value, "expected a list of task tables")
            specs.extend(_spec(full, str(v.get("name", "")) if isinstance(v, dict) else "", v) for v in value)
        elif norm in known:
            kwargs[norm] = coerce(full, value, getattr(TasksConfig(), norm))
        elif isinstance(value, dict):
            specs.append(_spec(full, key, value))
        else:
            allowed = ", ".join(sorted(known | {"specs"}))
            raise ConfigError(full, value, f"unknown key; allowed: {allowed}, or a [tasks.NAME] table")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"tasks.{s.name}", s.name, "task defined twice")
        seen.add(s.name)
    return TasksConfig(specs=tuple(specs), **kwargs)


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ConfigError(key, value, "expected task names, e.g. rt,bbc,tweets")
    for name in items:
        if not _NAME.match(name):
            raise ConfigError(key, name, "task names are 1-40 letters, digits or underscores")
    if len(set(items)) != len(items):
        raise ConfigError(key, value, "a task is named twice")
    return tuple(items)


def _spec(key: str, name: str, table: Any) -> TaskSpec:
    if not isinstance(table, dict):
        raise ConfigError(key, table, "expected a table with path, text_column, label_column, clients")
    if not _NAME.match(name):
        raise ConfigError(key, name, "task names are 1-40 letters, digits or underscores")
    allowed = {f.name for f in fields(TaskSpec)} - {"name"}
    kwargs: dict[str, Any] = {}
    for k, v in table.items():
        norm = k.replace("-", "_")
        if norm == "name":
            continue
        if norm not in allowed:
            raise ConfigError(f"tasks.{name}.{k}", v, f"unknown key; allowed: {', '.join(sorted(allowed))}")
        kwargs[norm] = coerce(f"tasks.{name}.{k}", v, getattr(TaskSpec(name), norm))
    return TaskSpec(name, **kwargs)


def check_tasks(cfg: RunConfig) -> None:
    """One-line ConfigError for an invalid ``[tasks]`` section (shipped names must be known to
    the run's task type, :data:`~fedpeft.config.schema.SHIPPED_TASKS_BY_TYPE`; clients must add
    up to ``train.clients``). Task files are checked by :mod:`fedpeft.load`."""
    t = cfg.tasks
    if not t.enabled:
        return
    if not 1 <= t.clients_per_task <= 100_000:
        raise ConfigError("tasks.clients_per_task", t.clients_per_task, "must be an integer in [1, 100000]")
    if t.partition not in TASK_PARTITIONS:
        raise ConfigError("tasks.partition", t.partition, f"allowed: {', '.join(TASK_PARTITIONS)}")
    if t.public_size < 0:
        raise ConfigError("tasks.public_size", t.public_size, "must be >= 0")
    if cfg.central.enabled:
        raise ConfigError("central.mode", cfg.central.mode, "client-level central DP is not supported in multi-task "
                                                            "runs (replies differ per task); use off")
    specs = t.resolved()
    shipped = SHIPPED_TASKS_BY_TYPE.get(cfg.task_type)  # None: a task type that checks names when loading
    for_type = "" if cfg.task_type == RunConfig().task_type else f" for task_type={cfg.task_type}"
    if len(specs) < 1:
        raise ConfigError("tasks.names", "", "name at least one task")
    for s in specs:
        if s.clients < 1:
            raise ConfigError(f"tasks.{s.name}.clients", s.clients, "must be >= 1")
        if not s.path and shipped is not None and s.name not in shipped:
            raise ConfigError("tasks.names", s.name, f"unknown task; shipped{for_type}: {', '.join(shipped)} "
                                                     f"(or give [tasks.{s.name}] a path)")
    total = sum(s.clients for s in specs)
    if cfg.train.clients != total:
        detail = ", ".join(f"{s.name}:{s.clients}" for s in specs)
        raise ConfigError("train.clients", cfg.train.clients,
                          f"the tasks need {total} clients ({detail}); pass --clients {total}")
