"""Per-process client state: parsed config, base model with adapter, tokenised data.

A Flower worker process (a Ray actor in simulation, a SuperNode's ClientApp process in
deployment) serves many rounds and, in simulation, many virtual clients. Everything that
does not change between rounds is built once here and reused: the parsed configuration
(keyed by its hash), the adapted model (its trainable state is overwritten with the
global state each round) and each client's data partition.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fedpeft.adapters import AdapterPlugin
from fedpeft.adapters import get as get_plugin
from fedpeft.config import RunConfig, config_from_toml
from fedpeft.config import config_hash as hash_of
from fedpeft.data.partition import client_partition
from fedpeft.data.sources import TextDataset, with_label_names
from fedpeft.tasks.model import load_tokenizer, pick_device
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
        pid = node_config.get("partition-id")
        cid = str(node_config.get("client-id", pid if pid is not None else "0"))
        ledger = node_config.get("ledger-dir") or round_config.get("ledger-dir") or "ledger"
        labels = tuple(json.loads(str(round_config.get("label-names") or "[]")))
        return cls(cid, None if node_config.get("data-path") else (int(pid) if pid is not None else 0),
                   str(node_config.get("data-path", "")), Path(str(ledger)), labels)


class Runtime:
    """Cached model + data for one configuration in this process."""

    _pool: TextDataset | None = None  # loaded on first use: a deployed node may not have the server's file
    _label_names: tuple[str, ...] = ()
    _fixed_num_labels: int | None = None

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin: AdapterPlugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self._model: nn.Module | None = None
        self._data: dict[str, TextDataset] = {}
        self.lock = threading.Lock()

    @property
    def pool(self) -> TextDataset:
        """The shared training pool of a simulation (``data.path`` on this machine)."""
        if self._pool is None:
            self._pool, _ = self.task_type.train_test_split(self.cfg.data, self.cfg.seed)
        return self._pool

    @pool.setter
    def pool(self, value: TextDataset) -> None:
        self._pool = value

    @property
    def num_labels(self) -> int:
        """Outputs of the model head: the server's label list when it sent one, else what the
        pool tells the task type (sequence classification: its number of classes)."""
        if self._fixed_num_labels is not None:
            return self._fixed_num_labels
        return len(self._label_names) if self._label_names else self.task_type.num_outputs(self.pool)

    @num_labels.setter
    def num_labels(self, value: int) -> None:  # subclasses that size their heads themselves
        self._fixed_num_labels = value

    @property
    def model(self) -> nn.Module:
        """The adapted model (built on first use; state is replaced every round)."""
        if self._model is None:
            base = self.task_type.build_model(self.cfg.model, self.num_labels, head_seed=self.cfg.adapter.seed)
            self._model = self.plugin.attach(base, self.cfg).to(self.device)
        return self._model

    def activate(self, model: nn.Module, ident: ClientIdentity) -> None:
        """Prepare the cached model for this client before its round (multi-task: its task)."""

    def data_for(self, ident: ClientIdentity, node_config: dict[str, Any]) -> TextDataset:
        if ident.client_id not in self._data:
            if ident.data_path:
                from dataclasses import replace

                data_cfg = replace(
                    self.cfg.data, path=ident.data_path,
                    text_column=str(node_config.get("text-column", self.cfg.data.text_column)),
                    label_column=str(node_config.get("label-column", self.cfg.data.label_column)),
                )
                # Map this node's string labels into the federation's vocabulary (sent by the
                # server), so label i is the same class on every node and on the server.
                self._label_names = ident.label_names or self.pool.label_names
                self._data[ident.client_id] = with_label_names(
                    self.task_type.load_data(data_cfg), self._label_names,
                    f"client {ident.client_id}'s {ident.data_path}")
            else:
                assert ident.partition_id is not None
                self._data[ident.client_id] = client_partition(
                    self.pool, self.cfg.data, self.cfg.train.clients, ident.partition_id, self.cfg.seed
                )
        return self._data[ident.client_id]


_RUNTIMES: dict[str, Runtime] = {}
_GUARD = threading.Lock()


class NodeRefusal(RuntimeError):
    """A failure whose text is safe to send to the server (it names no data: no labels,
    columns, file contents or paths). Every other exception is logged on the node and
    answered with a generic text (``fedpeft.client.app.train``)."""


def runtime_for(config_toml: str, config_hash: str) -> Runtime:
    """The process-wide runtime for a configuration (one at a time; memory stays flat).

    The configuration must hash to ``config_hash`` (checked before anything is cached): the
    hash keys this cache, the node's replays and the randomness of its DP rounds, so a
    configuration sent under another configuration's hash is refused.
    """
    with _GUARD:
        rt = _RUNTIMES.get(config_hash)
        if rt is None:
            cfg = config_from_toml(config_toml)
            if hash_of(cfg) != config_hash:
                raise NodeRefusal(f"the configuration does not match its hash {config_hash[:16]!r}")
            _RUNTIMES.clear()
            if cfg.tasks.enabled:  # multi-task federation: src/fedpeft/client/multitask.py
                from fedpeft.client.multitask import MultiTaskRuntime

                rt = MultiTaskRuntime(cfg)
            else:
                rt = Runtime(cfg)
            _RUNTIMES[config_hash] = rt
        return rt
