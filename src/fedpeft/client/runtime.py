"""Per-process client state: parsed config, task layout, base model with adapter, tokenised data.

A Flower worker process (a Ray actor in simulation, a SuperNode's ClientApp process in
deployment) serves many rounds and, in simulation, many virtual clients. Everything that
does not change between rounds is built once here and reused: the parsed configuration
(keyed by its hash), the adapted model (its trainable state is overwritten with the
global state each round) and each client's data partition.

One :class:`Runtime` serves every run: it holds the run's task layout
(:func:`fedpeft.data.layout.task_layout`), a single-task run being a layout of one task on the
model's own head. The per-task part applies only when the layout has per-task heads
(``[tasks]``): a simulated client learns its task from its partition id (clients are numbered
task by task); a deployed node names it in its node config (``task = "bbc"`` next to
``data-path``), and its file must use exactly that task's labels. Before each round
:meth:`Runtime.activate` routes the cached model's heads to the client's task and makes only
the shared and that task's tensors trainable (a causal LM has no heads: the task-owned
tensors are the adapter's own, e.g. MTLoRA's task branches), so the reply carries nothing
of other tasks
(one cached model serves every virtual client of a worker process; the activation is redone
every round). A plugin with a one-off data release (:class:`~fedpeft.adapters.capabilities.DataRelease`, ICM-LoRA's task
vector) gets it there too, recorded in the client's ledger before its first DP-SGD step
(:mod:`fedpeft.client.task_release`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

import fedpeft.wire as wire
from fedpeft.adapters import AdapterPlugin
from fedpeft.adapters import get as get_plugin
from fedpeft.adapters.capabilities import DataRelease
from fedpeft.client.errors import NodeRefusal
from fedpeft.client.task_release import ensure_release
from fedpeft.client.token_cache import cached_encoding
from fedpeft.config import ConfigError, DataConfig, RunConfig
from fedpeft.config import config_hash as hash_of
from fedpeft.data.batching import Batch
from fedpeft.data.layout import TaskData, activate_task
from fedpeft.data.sources import TextDataset, file_stamp
from fedpeft.load import config_from_toml
from fedpeft.tasks.heads import layout_base_model
from fedpeft.tasks.model import pick_device
from fedpeft.tasks.registry import task_for

__all__ = ["ClientIdentity", "NodeRefusal", "Runtime", "runtime_for"]


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is and where its private things live."""

    client_id: str
    partition_id: int | None  # simulation: index into the shared pool
    data_path: str  # deployment: the node's own file ("" in simulation)
    ledger_dir: Path
    # The federation's label vocabulary as the server sent it (round config ``label-names``);
    # a deployed node maps its own file's string labels with it. Empty: use the pool's.
    label_names: tuple[str, ...] = ()

    @classmethod
    def from_node(cls, node_config: dict[str, Any], round_config: dict[str, Any]) -> ClientIdentity:
        """Deployment keys (``client-id``, ``data-path``, ``ledger-dir``) win over simulation's."""
        pid = node_config.get(wire.PARTITION_ID)
        cid = str(node_config.get(wire.CLIENT_ID, pid if pid is not None else "0"))
        ledger = node_config.get(wire.LEDGER_DIR) or round_config.get(wire.LEDGER_DIR) or "ledger"
        labels = tuple(json.loads(str(round_config.get(wire.LABEL_NAMES) or "[]")))
        return cls(cid, None if node_config.get(wire.DATA_PATH) else (int(pid) if pid is not None else 0),
                   str(node_config.get(wire.DATA_PATH, "")), Path(str(ledger)), labels)


class Runtime:
    """Cached model + data for one configuration in this process."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin: AdapterPlugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = self.task_type.load_tokenizer(cfg.model)
        self.layout = self.task_type.task_layout(cfg)  # a single task's data: on first use
        self._model: nn.Module | None = None
        self._data: dict[str, TextDataset] = {}
        self._stamps: dict[str, tuple[int, int, int]] = {}  # a deployed node's file: (inode, size, mtime)
        self._task: dict[str, TaskData] = {}
        # The federation's label vocabulary as a deployed single-task node was sent it (sizes the head).
        self._label_names: tuple[str, ...] = ()
        self.lock = threading.Lock()

    @property
    def model(self) -> nn.Module:
        """The adapted model (built on first use; state is replaced every round)."""
        if self._model is None:
            base = layout_base_model(self.cfg, self.layout, self._label_names)
            self._model = self.plugin.attach(base, self.cfg).to(self.device)
        return self._model

    def task_of(self, ident: ClientIdentity, node_config: dict[str, Any] | None = None) -> TaskData:
        """The task this client holds: its partition's, or the one its node config names
        (a single-task layout's one task needs no name)."""
        if ident.client_id not in self._task:
            if not self.layout.per_task:
                self._task[ident.client_id] = self.layout[0]
            elif ident.partition_id is not None:
                self._task[ident.client_id] = self.layout.client_task(ident.partition_id)
            else:
                name = str((node_config or {}).get(wire.TASK, ""))
                task = self.layout.named(name)
                if task is None:
                    raise ConfigError("node-config task", name, f"a multi-task node must name its task: "
                                                                f"{', '.join(t.name for t in self.layout)}")
                self._task[ident.client_id] = task
        return self._task[ident.client_id]

    def activate(self, model: nn.Module, ident: ClientIdentity) -> None:
        """Prepare the cached model for this client before its round: with per-task heads,
        route it to the client's task (and make that task's one-off release); else nothing."""
        if not self.layout.per_task:
            return
        task = self.task_of(ident).name
        activate_task(model, task)
        if isinstance(self.plugin, DataRelease):  # a one-off DP release (ICM-LoRA's task vector)
            ensure_release(self.plugin, self.cfg, self.tokenizer, model, lambda: self.data_for(ident, {}), task,
                           ident.ledger_dir, ident.client_id)

    def data_for(self, ident: ClientIdentity, node_config: dict[str, Any]) -> TextDataset:
        """This client's examples: its partition of its task's pool, or a deployed node's own file
        (read again when the file changed: a node's warm worker outlives rounds and runs)."""
        if ident.data_path and self._stamps.get(ident.client_id) != (stamp := file_stamp(ident.data_path)):
            self._data.pop(ident.client_id, None)
            self._stamps[ident.client_id] = stamp
        if ident.client_id not in self._data:
            task = self.task_of(ident, node_config)
            if ident.data_path:
                data_cfg = replace(
                    self.cfg.data, path=ident.data_path,
                    text_column=str(node_config.get(wire.TEXT_COLUMN, task.spec.text_column)),
                    label_column=str(node_config.get(wire.LABEL_COLUMN, task.spec.label_column)),
                )
                self._data[ident.client_id] = self._node_labels(data_cfg, task, ident)
            else:
                assert ident.partition_id is not None
                self._data[ident.client_id] = task.client_data(self.cfg, ident.partition_id)
        return self._data[ident.client_id]

    def encoded(self, ident: ClientIdentity, data: TextDataset) -> Batch:
        """This client's examples encoded by the task type, cached (:mod:`fedpeft.client.token_cache`):
        in memory, and for a deployed node also in ``<ledger-dir>/cache`` on its own disk."""
        cache_dir = ident.ledger_dir / "cache" if ident.data_path else None
        return cached_encoding(self.tokenizer, data, self.cfg.model.max_length, self.task_type, cache_dir)

    def _node_labels(self, data_cfg: DataConfig, task: TaskData, ident: ClientIdentity) -> TextDataset:
        """A deployed node's file with the federation's labels. A task of a multi-task layout
        with per-task heads must use exactly its labels (they size its head; a task type
        without heads has strata, not classes, and takes the file as it is); a single-task
        node's string labels are mapped into the federation's vocabulary (sent by the server),
        so label i is the same class on every node and on the server."""
        if self.layout.per_task:
            local = self.task_type.load_data(data_cfg)
            if self.task_type.head_prefixes and local.label_names != task.label_names:
                raise ValueError(f"client {ident.client_id}: labels {local.label_names} differ from task "
                                 f"{task.name}'s {task.label_names}")
            return local
        self._label_names = ident.label_names or task.pool.label_names
        return self.task_type.with_federation_labels(self.task_type.load_data(data_cfg), self._label_names,
                                                     f"client {ident.client_id}'s {ident.data_path}")


_RUNTIMES: dict[str, Runtime] = {}
_GUARD = threading.Lock()


def runtime_for(config_toml: str, config_hash: str) -> Runtime:
    """The process-wide runtime for a configuration (one at a time; memory stays flat).

    The configuration must hash to ``config_hash`` (checked before anything is cached): the
    hash keys this cache, the node's replays and the randomness of its DP rounds, so a
    configuration sent under another configuration's hash is refused.
    """
    with _GUARD:
        rt = _RUNTIMES.get(config_hash)
        if rt is None:
            cfg = config_from_toml(config_toml, role="node")  # not the server's data files
            if hash_of(cfg) != config_hash:
                raise NodeRefusal(f"the configuration does not match its hash {config_hash[:16]!r}")
            _RUNTIMES.clear()
            rt = Runtime(cfg)
            _RUNTIMES[config_hash] = rt
        return rt
