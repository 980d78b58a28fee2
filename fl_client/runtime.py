"""Per-process client state: parsed config, base model with adapter, tokenised data.

A Flower worker process (a Ray actor in simulation, a SuperNode's ClientApp process in
deployment) serves many rounds and, in simulation, many virtual clients. Everything that
does not change between rounds is built once here and reused: the parsed configuration
(keyed by its hash), the adapted model (its trainable state is overwritten with the
global state each round) and each client's data partition.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adapters import AdapterPlugin
from adapters import get as get_plugin
from task.config import RunConfig, config_from_toml
from task.data import TextDataset, load_dataset, train_test_split_for
from task.model import load_base_model, load_tokenizer, pick_device
from task.partition import client_partition

__all__ = ["ClientIdentity", "Runtime", "runtime_for"]


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is and where its private things live."""

    client_id: str
    partition_id: int | None  # simulation: index into the shared pool
    data_path: str  # deployment: the node's own file ("" in simulation)
    ledger_dir: Path

    @classmethod
    def from_node(cls, node_config: dict[str, Any], round_config: dict[str, Any]) -> ClientIdentity:
        """Deployment keys (``client-id``, ``data-path``, ``ledger-dir``) win over simulation's."""
        pid = node_config.get("partition-id")
        cid = str(node_config.get("client-id", pid if pid is not None else "0"))
        ledger = node_config.get("ledger-dir") or round_config.get("ledger-dir") or "ledger"
        return cls(cid, None if node_config.get("data-path") else (int(pid) if pid is not None else 0),
                   str(node_config.get("data-path", "")), Path(str(ledger)))


class Runtime:
    """Cached model + data for one configuration in this process."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.plugin: AdapterPlugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pool, _ = train_test_split_for(cfg.data, cfg.seed)
        self.num_labels = self.pool.num_classes
        self._model: nn.Module | None = None
        self._data: dict[str, TextDataset] = {}
        self.lock = threading.Lock()

    @property
    def model(self) -> nn.Module:
        """The adapted model (built on first use; state is replaced every round)."""
        if self._model is None:
            base = load_base_model(self.cfg.model, self.num_labels, head_seed=self.cfg.adapter.seed)
            self._model = self.plugin.attach(base, self.cfg).to(self.device)
        return self._model

    def data_for(self, ident: ClientIdentity, node_config: dict[str, Any]) -> TextDataset:
        if ident.client_id not in self._data:
            if ident.data_path:
                from dataclasses import replace

                data_cfg = replace(
                    self.cfg.data, path=ident.data_path,
                    text_column=str(node_config.get("text-column", self.cfg.data.text_column)),
                    label_column=str(node_config.get("label-column", self.cfg.data.label_column)),
                )
                local = load_dataset(data_cfg)
                if local.label_names != self.pool.label_names:
                    raise ValueError(
                        f"client {ident.client_id}: labels {local.label_names} differ from the federation's "
                        f"{self.pool.label_names}"
                    )
                self._data[ident.client_id] = local
            else:
                assert ident.partition_id is not None
                self._data[ident.client_id] = client_partition(
                    self.pool, self.cfg.data, self.cfg.train.clients, ident.partition_id, self.cfg.seed
                )
        return self._data[ident.client_id]


_RUNTIMES: dict[str, Runtime] = {}
_GUARD = threading.Lock()


def runtime_for(config_toml: str, config_hash: str) -> Runtime:
    """The process-wide runtime for a configuration (one at a time; memory stays flat)."""
    with _GUARD:
        rt = _RUNTIMES.get(config_hash)
        if rt is None:
            _RUNTIMES.clear()
            rt = Runtime(config_from_toml(config_toml))
            _RUNTIMES[config_hash] = rt
        return rt
