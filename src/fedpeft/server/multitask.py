"""The server's per-task part of a multi-task layout (``[tasks]`` set): specs, evaluation, public data.

:class:`fedpeft.server.setup.ServerSetup` composes a :class:`PerTaskServer` when its task
layout has per-task heads (:func:`fedpeft.data.layout.task_layout`); a single-task layout
needs none of this, and its rows keep their keys:

* the model carries one head per task if the task type has heads
  (:func:`fedpeft.tasks.heads.layout_base_model`; a causal LM has none, its task-owned tensors
  are the adapter's) and the server keeps *every* task's trainable tensors in the global
  state (it activates no task);
* the reply spec is per task (:class:`fedpeft.strategies.multitask_avg.MultiTaskSpec`): shared
  adapter tensors plus the tensors owned by exactly one task -- a reply is checked against
  the task whose tensor names it carries, and aggregated by
  :class:`fedpeft.strategies.multitask_avg.MultiTaskAvg` (per-task tensors only within that task's
  group), the strategy a setup with per-task specs asks for;
* evaluation runs every task on its own held-out split, routed to it; the task type's
  metrics in ``metrics.jsonl`` (``accuracy`` / ``loss`` for classification, ``exact_match`` /
  ``loss`` / ``perplexity`` for causal-lm) are the unweighted means over tasks,
  ``<metric>_per_task`` the per-task values, and ``clients_per_task`` / ``train_loss_per_task``
  what each task group contributed (``clients_task_unknown``: replies with no task-owned tensor) (:func:`per_task_row`, added by
  :class:`fedpeft.server.setup.MultiTaskHook`); in a DP run
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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import fedpeft.wire as wire
from fedpeft.adapters import AdapterPlugin
from fedpeft.adapters.capabilities import PublicStep, ReplyVariants, ServerState
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch, to_device
from fedpeft.data.layout import TaskData, TaskLayout, activate_task, owned_task
from fedpeft.data.sources import TextDataset
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.multitask_avg import MultiTaskSpec
from fedpeft.strategies.validation import StateSpec
from fedpeft.tasks.registry import task_for

__all__ = ["PerTaskServer", "numpy_state", "per_task_row"]


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Detached CPU copies of a model state's tensors."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


class PerTaskServer:
    """Per-task specs, state, evaluation and public data of the server's multi-head model."""

    def __init__(self, cfg: RunConfig, plugin: AdapterPlugin, model: nn.Module, layout: TaskLayout,
                 tokenizer: Any, device: torch.device) -> None:
        self.cfg, self.plugin, self.model = cfg, plugin, model
        self.task_type = task_for(cfg)
        self.tasks: tuple[TaskData, ...] = layout.tasks
        self.tokenizer, self.device = tokenizer, device

    def reply_specs(self) -> dict[str, StateSpec]:
        """The tensors a reply of each task's clients carries (per reply variant); leaves
        every task's tensors trainable (the server activates no task)."""
        per_task: dict[str, StateSpec] = {}
        plugin = self.plugin
        for task in self.tasks:
            activate_task(self.model, task.name)
            replies = (plugin.reply_variants(self.model) if isinstance(plugin, ReplyVariants)  # MeteoRA: per phase
                       else {"": plugin.trainable_state(self.model)})
            for suffix, reply in replies.items():
                per_task[task.name + suffix] = StateSpec.from_state(numpy_state(reply))
        activate_task(self.model, None)
        return per_task

    def global_state(self) -> dict[str, np.ndarray]:
        """Every task's trainable tensors plus the plugin's server-side ones (sent down only)."""
        state = numpy_state(self.plugin.trainable_state(self.model))
        if isinstance(self.plugin, ServerState):
            state.update(numpy_state(self.plugin.server_state(self.model)))
        return state

    @staticmethod
    def spec(state: dict[str, np.ndarray], fingerprint: str, replies: dict[str, StateSpec]) -> MultiTaskSpec:
        """The full global state's spec plus each task's reply spec, all under ``fingerprint``."""
        per_task = {k: StateSpec(v.tensors, fingerprint) for k, v in replies.items()}
        full = StateSpec.from_state(state, fingerprint)
        return MultiTaskSpec(full.tensors, fingerprint, per_task)

    def evaluate(self, evaluate_on: Callable[[TextDataset], dict[str, float]]) -> tuple[dict[str, float], dict[str, Any]]:
        """(means over tasks, per-task values): every task on its own held-out split, routed to
        it, for each of the task type's metrics (``accuracy``/``loss`` for classification;
        ``exact_match``/``loss``/``perplexity`` for causal-lm: a task's own strata tables are
        not kept, the task is the unit here)."""
        per: dict[str, dict[str, float]] = {m: {} for m in self.task_type.metric_names}
        for task in self.tasks:
            activate_task(self.model, task.name)
            ev = evaluate_on(task.test)
            for metric in per:
                per[metric][task.name] = float(ev[metric])
        activate_task(self.model, None)
        means = {metric: float(np.mean(list(values.values()))) for metric, values in per.items()}
        return means, {f"{metric}_per_task": values for metric, values in per.items()}

    def samples(self) -> list[dict[str, str]]:
        """The task type's sample outputs (:meth:`~fedpeft.tasks.base.TaskType.samples`) on
        every task's held-out split, routed to that task. ``task`` names the layout's task;
        ``source`` what the sample's own ``task`` said where that is more (a stratum of a task
        with several, or an open question such as ``mtbench`` answered by this task's routing)."""
        out: list[dict[str, str]] = []
        for task in self.tasks:
            activate_task(self.model, task.name)
            only = task.test.label_names if len(task.test.label_names) == 1 else ()
            for row in self.task_type.samples(self.model, self.tokenizer, task.test, self.cfg.model.max_length,
                                              self.device, self.cfg.model.max_new_tokens):
                source = row.get("task", "")
                out.append({"task": task.name, **({"source": source} if source and source not in only else {}),
                            **{k: v for k, v in row.items() if k != "task"}})
        activate_task(self.model, None)
        return out

    def public_batches(self) -> Iterator[tuple[str, Batch]]:
        """(task, model inputs) over the server-held sample of every task (its targets unused)."""
        for task in self.tasks:
            for batch in self.task_type.eval_batches(self.tokenizer, task.public, 64, self.cfg.model.max_length):
                yield task.name, to_device(self.task_type.model_inputs(batch), self.device)

    def public_step(self) -> bool:
        """The plugin's server-side step on public data, if it has one; True if it ran (the
        global state changed)."""
        plugin = self.plugin
        if not isinstance(plugin, PublicStep) or not any(len(t.public) for t in self.tasks):
            return False

        def routed() -> Iterator[Batch]:
            for name, batch in self.public_batches():
                activate_task(self.model, name)
                yield batch
            activate_task(self.model, None)

        plugin.public_step(self.model, routed(), self.cfg)
        activate_task(self.model, None)
        return True


def per_task_row(tasks: Sequence[Any], dp: bool, report: RoundReport) -> dict[str, Any]:
    """``clients_per_task``, ``train_loss_per_task``, ``clients_task_unknown`` and ``tasks`` of a
    round's row: what each task group contributed (in a DP run no client loss is read: see the
    module doc). A reply is attributed by its task-owned tensors; one that carries none (only
    shared tensors: a task type without heads and a method without task modules, SMoRA, or
    MeteoRA's gate rounds) does not say its task and is only counted in ``clients_task_unknown``."""
    counts: dict[str, int] = {t.name: 0 for t in tasks}
    losses: dict[str, list[float]] = {t.name: [] for t in tasks}
    unknown = 0
    for reply in (report.accepted if report.released else []):
        owners = {owned_task(k) for k in reply.state} - {None}
        unknown += not owners
        loss = None if dp else reply.metrics.get(wire.TRAIN_LOSS)  # DP: never read a client's loss
        for owner in owners:
            counts[str(owner)] += 1
            if isinstance(loss, (int, float)):  # absent: not averaged in as NaN
                losses[str(owner)].append(float(loss))
    return {
        "clients_per_task": counts,
        # None in DP runs (no reply carries a loss); per task None when no reply of it had one
        "train_loss_per_task": None if dp else {k: (float(np.mean(v)) if v else None) for k, v in losses.items()},
        "clients_task_unknown": unknown,
        "tasks": [t.name for t in tasks],
    }
