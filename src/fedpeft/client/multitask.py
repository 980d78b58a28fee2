"""Client side of a multi-task federation: the task a client holds and its model.

:class:`MultiTaskRuntime` stands in for :class:`fedpeft.client.runtime.Runtime` when the run's
configuration has ``[tasks]``. A simulated client learns its task from its partition id
(clients are numbered task by task, :func:`fedpeft.data.layout.client_task`); a deployed node
names it in its node config (``task = "bbc"`` next to ``data-path``), and its file must use
exactly that task's labels. Before each round :meth:`activate` routes the cached model's
heads to the client's task and makes only the shared and that task's tensors trainable,
so the reply carries nothing of other tasks (one cached model serves every virtual client
of a worker process; the activation is redone every round). A plugin with a one-off data
release (``release_vectors``, ICM-LoRA's task vector) gets it there too, recorded in the
client's ledger before its first DP-SGD step (:mod:`fedpeft.client.task_release`).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from torch import nn

from fedpeft.adapters import get as get_plugin
from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.layout import activate_task, client_task, task_layout
from fedpeft.data.sources import TextDataset
from fedpeft.tasks.model import load_tokenizer, pick_device
from fedpeft.tasks.multihead import build_multitask_model
from fedpeft.tasks.registry import task_for

__all__ = ["MultiTaskRuntime"]


class MultiTaskRuntime(Runtime):
    """Cached multi-head model and per-client task data for one multi-task configuration."""

    def __init__(self, cfg: RunConfig) -> None:  # Runtime.__init__ would load the single-task pool
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.tasks = {t.name: t for t in task_layout(cfg)}
        self.pool = next(iter(self.tasks.values())).pool
        self.num_labels = 0  # one head per task
        self._model: nn.Module | None = None
        self._data: dict[str, TextDataset] = {}
        self._task: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = build_multitask_model(self.cfg, self.plugin).to(self.device)
        return self._model

    def task_of(self, ident: ClientIdentity, node_config: dict[str, Any] | None = None) -> str:
        if ident.client_id not in self._task:
            if ident.partition_id is not None:
                self._task[ident.client_id] = client_task(self.cfg, ident.partition_id).name
            else:
                name = str((node_config or {}).get("task", ""))
                if name not in self.tasks:
                    raise ConfigError("node-config task", name, f"a multi-task node must name its task: "
                                                                f"{', '.join(self.tasks)}")
                self._task[ident.client_id] = name
        return self._task[ident.client_id]

    def activate(self, model: nn.Module, ident: ClientIdentity) -> None:
        task = self.task_of(ident)
        activate_task(model, task)
        if hasattr(self.plugin, "release_vectors"):  # a one-off DP release (ICM-LoRA's task vector)
            from fedpeft.client.task_release import ensure_release

            ensure_release(self, model, ident, task)

    def data_for(self, ident: ClientIdentity, node_config: dict[str, Any]) -> TextDataset:
        if ident.client_id not in self._data:
            task = self.tasks[self.task_of(ident, node_config)]
            if ident.data_path:
                data_cfg = replace(
                    self.cfg.data, path=ident.data_path,
                    text_column=str(node_config.get("text-column", task.spec.text_column)),
                    label_column=str(node_config.get("label-column", task.spec.label_column)),
                )
                local = self.task_type.load_data(data_cfg)
                if local.label_names != task.label_names:
                    raise ValueError(f"client {ident.client_id}: labels {local.label_names} differ from task "
                                     f"{task.name}'s {task.label_names}")
                self._data[ident.client_id] = local
            else:
                assert ident.partition_id is not None
                self._data[ident.client_id] = task.client_data(self.cfg, ident.partition_id)
        return self._data[ident.client_id]
