"""Server side of a multi-task federation (``[tasks]`` set): model, specs, evaluation.

:class:`MultiTaskSetup` stands in for :class:`fedpeft.server.loop.ServerSetup` (the round loop
picks it when ``cfg.tasks.enabled``):

* the model carries one head per task (:func:`fedpeft.tasks.multihead.build_multitask_model`)
  and the server keeps *every* task's trainable tensors in the global state (it activates no
  task);
* the reply spec is per task (:class:`fedpeft.strategies.multitask_avg.MultiTaskSpec`): shared
  adapter tensors plus the tensors owned by exactly one task -- a reply is checked against
  the task whose tensor names it carries, and aggregated by
  :class:`fedpeft.strategies.multitask_avg.MultiTaskAvg` (per-task tensors only within that task's
  group);
* evaluation runs every task on its own held-out split; the task type's metrics
  (``accuracy`` / ``loss`` for sequence classification) in ``metrics.jsonl`` are the
  unweighted means over tasks, ``accuracy_per_task`` / ``loss_per_task`` the per-task
  values, and ``clients_per_task`` / ``train_loss_per_task`` what each task group contributed
  (:class:`MultiTaskHook`); in a DP run
  ``train_loss_per_task`` is ``None``: the server is the adversary DP-SGD protects against,
  so DP replies carry no training loss (nothing the accountant does not cover leaves a
  client) and nothing here reads client training statistics -- a reply is read only for
  its tensor names (which task it holds, known to any per-task aggregation) and its
  ``num-examples`` weight;
* a plugin with a server-side *public-data step* (``public_step(model, batches, cfg)``,
  SMoRA's routing-bias update) gets it after each round's evaluation, on the unlabelled
  server-held sample of every task (``tasks.public_size``); tensors it changes are listed by
  ``plugin.server_state(model)`` and travel down only;
* a plugin whose clients send different tensors in different rounds lists every reply
  shape with ``reply_variants(model) -> {suffix: state}`` (the active task's; specs are keyed
  ``<task><suffix>``), and ``server_round_end(setup, round, report) -> dict`` adds the
  method's own server-side work and metrics to each round's row (MeteoRA, ICM-LoRA).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import get as get_plugin
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch, to_device
from fedpeft.data.layout import activate_task, owned_task, task_layout
from fedpeft.server.loop import RoundHook, ServerSetup
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.multitask_avg import MultiTaskAvg, MultiTaskSpec
from fedpeft.strategies.validation import StateSpec
from fedpeft.tasks.model import load_tokenizer, pick_device
from fedpeft.tasks.multihead import build_multitask_model
from fedpeft.tasks.registry import task_for

__all__ = ["MultiTaskHook", "MultiTaskSetup"]

log = logging.getLogger("fedpeft.server")


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


class MultiTaskSetup(ServerSetup):
    """Server-side model with every task's head, per-task specs and per-task evaluation."""

    strategy_class = MultiTaskAvg

    def __init__(self, cfg: RunConfig) -> None:  # noqa: D107 -- ServerSetup.__init__ is single-task
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.tasks = task_layout(cfg)
        self.test = self.tasks[0].test
        self.model = build_multitask_model(cfg, self.plugin).to(self.device)
        per_task: dict[str, StateSpec] = {}
        variants = getattr(self.plugin, "reply_variants", None)  # e.g. MeteoRA: one reply per phase
        for task in self.tasks:
            activate_task(self.model, task.name)
            replies = variants(self.model) if variants is not None else {"": self.plugin.trainable_state(self.model)}
            for suffix, reply in replies.items():
                per_task[task.name + suffix] = StateSpec.from_state(_numpy(reply))
        activate_task(self.model, None)
        self.state = self._global_state()
        fingerprint = self.plugin.frozen_fingerprint(self.model)
        per_task = {k: StateSpec(v.tensors, fingerprint) for k, v in per_task.items()}
        full = StateSpec.from_state(self.state, fingerprint)
        self.spec = MultiTaskSpec(full.tensors, fingerprint, per_task)
        self.last_eval: dict[str, Any] = {}
        self.hooks = [MultiTaskHook(self)]

    def _global_state(self) -> dict[str, np.ndarray]:
        state = _numpy(self.plugin.trainable_state(self.model))
        server_state = getattr(self.plugin, "server_state", None)
        if server_state is not None:
            state.update(_numpy(server_state(self.model)))
        return state

    def evaluate(self) -> dict[str, Any]:
        """Every task on its own held-out split; means over tasks plus per-task values
        (``<metric>_per_task`` for each of the task type's metrics)."""
        names = self.task_type.metric_names
        per_task: dict[str, dict[str, float]] = {name: {} for name in names}
        for task in self.tasks:
            activate_task(self.model, task.name)
            ev = self.task_type.evaluate(self.model, self.tokenizer, task.test, self.cfg.model.max_length,
                                         self.device)
            for name in names:
                per_task[name][task.name] = ev[name]
        activate_task(self.model, None)
        self.last_eval = {f"{name}_per_task": per_task[name] for name in names}
        return {**{name: float(np.mean(list(per_task[name].values()))) for name in names}, **self.last_eval}

    def public_batches(self) -> Iterator[tuple[str, Batch]]:
        """(task, model inputs) over the server-held sample of every task (its targets unused)."""
        for task in self.tasks:
            for batch in self.task_type.eval_batches(self.tokenizer, task.public, 64, self.cfg.model.max_length):
                yield task.name, to_device(self.task_type.model_inputs(batch), self.device)

    def public_step(self) -> None:
        """The plugin's server-side step on public data, if it has one; updates the state."""
        step = getattr(self.plugin, "public_step", None)
        if step is None or not any(len(t.public) for t in self.tasks):
            return

        def routed() -> Iterator[Batch]:
            for name, batch in self.public_batches():
                activate_task(self.model, name)
                yield batch
            activate_task(self.model, None)

        step(self.model, routed(), self.cfg)
        activate_task(self.model, None)
        self.state = self._global_state()


class MultiTaskHook(RoundHook):
    """Adds per-task results to each ``metrics.jsonl`` row, then runs the public-data step."""

    def __init__(self, setup: MultiTaskSetup) -> None:
        self.setup = setup

    def on_round_end(self, server_round: int, row: dict[str, Any], report: RoundReport) -> None:
        row.update(self.setup.last_eval)
        dp = self.setup.cfg.privacy.enabled
        counts: dict[str, int] = {t.name: 0 for t in self.setup.tasks}
        losses: dict[str, list[float]] = {t.name: [] for t in self.setup.tasks}
        for reply in (report.accepted if report.released else []):
            owners = {owned_task(k) for k in reply.state} - {None}
            loss = None if dp else reply.metrics.get("train-loss")  # DP: never read a client's loss
            for owner in owners:
                counts[str(owner)] += 1
                if isinstance(loss, (int, float)):  # absent: not averaged in as NaN
                    losses[str(owner)].append(float(loss))
        row["clients_per_task"] = counts
        # None in DP runs (no reply carries a loss); per task None when no reply of it had one
        row["train_loss_per_task"] = None if dp else {k: (float(np.mean(v)) if v else None)
                                                       for k, v in losses.items()}
        row["tasks"] = [t.name for t in self.setup.tasks]
        if report.released:
            self.setup.public_step()
        round_end = getattr(self.setup.plugin, "server_round_end", None)  # method-specific server work
        if round_end is not None:
            row.update(round_end(self.setup, server_round, report))
        metric = task_for(self.setup.cfg).primary_metric
        per_task = " ".join(f"{k}={v:.4f}" for k, v in row.get(f"{metric}_per_task", {}).items())
        log.info("round %d: per-task %s %s (mean %.4f)", server_round, metric, per_task, row[metric])
