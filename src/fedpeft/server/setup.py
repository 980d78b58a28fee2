"""The server's side of one configuration: task layout, model, global state, spec, evaluation.

:class:`ServerSetup` serves every run. It holds the run's task layout
(:meth:`fedpeft.tasks.base.TaskType.task_layout`): a single-task run is a layout of one task,
on the model's own head, with the pool and test split it always had; a multi-task run
(``[tasks]``) is a layout whose tasks have their own data (and heads, for a task type with
heads), and only then does the setup compose the per-task part (:class:`fedpeft.server.multitask.PerTaskServer`: per-task reply specs, the
plugin's server-side tensors, per-task evaluation and public data) and the
:class:`MultiTaskHook` that adds the per-task fields to each round's row. The aggregation
strategy follows from the spec (:func:`fedpeft.strategies.registry.build_base`): the multi-task
variant of the configured strategy when there are per-task reply specs. A single-task plugin
whose replies differ by round (:class:`~fedpeft.adapters.capabilities.ReplyVariants` with more
than one variant: RoLoRA's B and A rounds) gets one reply spec per variant the same way, and
its :class:`~fedpeft.adapters.capabilities.ServerState` tensors in the global state.

:class:`RoundHook` is the round loop's extension point (:mod:`fedpeft.server.loop`); it lives
here, beside the setup it is handed, so that the loop and the per-task hook both build on it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import get as get_plugin
from fedpeft.adapters.capabilities import FrozenDelta, ReplyVariants, ServerRoundHook, ServerRoundWork, ServerState
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch
from fedpeft.data.sources import TextDataset
from fedpeft.server.multitask import PerTaskServer, numpy_state, per_task_row
from fedpeft.server.run_dir import RunDir
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.validation import StateSpec
from fedpeft.tasks.heads import layout_base_model
from fedpeft.tasks.model import pick_device
from fedpeft.tasks.registry import task_for

__all__ = ["MultiTaskHook", "RoundHook", "ServerSetup"]

log = logging.getLogger("fedpeft.server")


class RoundHook:
    """Extension point for the round loop (heterogeneous-client emulation, reliability,
    reporting). Every method is optional; ``on_round_end`` may add keys to ``row`` before it
    is written to ``metrics.jsonl``. A hook with state that a resumed run needs also has
    ``state_dict()`` / ``load_state_dict(state)`` (:class:`fedpeft.strategies.state.Stateful`):
    the checkpoint saves it after every round and a resume restores it *before* ``on_start``."""

    def on_start(self, setup: ServerSetup, strategy: Strategy, run_dir: RunDir) -> None:
        """Called once before round 1."""

    def on_round_end(self, server_round: int, row: dict[str, Any], report: RoundReport) -> None:
        """Called after aggregation and evaluation of each round."""

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        """Called once after the last round (also after a failure, with the rows so far)."""


class ServerSetup:
    """Server-side model, test data and initial global state for one configuration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = self.task_type.load_tokenizer(cfg.model)
        self.layout = self.task_type.task_layout(cfg)
        self.tasks = self.layout.tasks
        self.test = self.layout[0].test  # deployed nodes are sent its label names
        self.model = self.plugin.attach(layout_base_model(cfg, self.layout), cfg).to(self.device)
        self.per_task = PerTaskServer(cfg, self.plugin, self.model, self.layout, self.tokenizer, self.device) \
            if self.layout.per_task else None
        self.variants = self._reply_variants() if self.per_task is None else {}
        replies = self.per_task.reply_specs() if self.per_task is not None else \
            {k: StateSpec.from_state(v) for k, v in self.variants.items()}
        self.state = self._global_state()
        fingerprint = self.plugin.frozen_fingerprint(self.model)
        self.spec: StateSpec = PerTaskServer.spec(self.state, fingerprint, replies) if replies \
            else StateSpec.from_state(self.state, fingerprint)
        if isinstance(self.plugin, FrozenDelta):  # goes down with the global state, never in a reply (spec above)
            self.state = {**self.state, **numpy_state(self.plugin.frozen_delta(self.model))}
        self.last_eval: dict[str, Any] = {}  # per-task values of the last evaluation
        self.hooks: list[RoundHook] = [MultiTaskHook(self)] if self.per_task is not None else []
        if self.task_type.evaluates_initial_model:  # a generative task: round-0 score and samples
            from fedpeft.server.samples import SamplesHook

            self.hooks.append(SamplesHook(self))  # type: ignore[arg-type]

    def _reply_variants(self) -> dict[str, dict[str, np.ndarray]]:
        """The replies of a single-task plugin whose replies differ by round (RoLoRA: B rounds,
        A rounds), by suffix: each gets its reply spec (validated and aggregated as per-task
        specs are); none for every other plugin."""
        if not isinstance(self.plugin, ReplyVariants):
            return {}
        variants = self.plugin.reply_variants(self.model)
        return {k: numpy_state(v) for k, v in variants.items()} if len(variants) > 1 else {}

    def _global_state(self) -> dict[str, np.ndarray]:
        if self.per_task is not None:
            return self.per_task.global_state()
        if not self.variants:
            return numpy_state(self.plugin.trainable_state(self.model))
        state = {k: v for variant in self.variants.values() for k, v in variant.items()}  # every reply's tensors
        if isinstance(self.plugin, ServerState):  # and the down-only ones (RoLoRA's round count)
            state.update(numpy_state(self.plugin.server_state(self.model)))
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.plugin.load_state(self.model, state)

    def evaluate_on(self, data: TextDataset) -> dict[str, float]:
        """The task type's metrics of the model (as routed now) on one held-out split."""
        return self.task_type.evaluate(self.model, self.tokenizer, data, self.cfg.model.max_length, self.device)

    def evaluate(self) -> dict[str, Any]:
        """The held-out split; with per-task heads every task's, as means plus per-task values."""
        if self.per_task is None:
            return self.evaluate_on(self.test)
        means, self.last_eval = self.per_task.evaluate(self.evaluate_on)
        return {**means, **self.last_eval}

    def samples(self) -> list[dict[str, str]]:
        """A few outputs of the model on held-out data (:meth:`~fedpeft.tasks.base.TaskType.samples`);
        in a multi-task layout every task's, routed to it."""
        if self.per_task is not None:
            return self.per_task.samples()
        return self.task_type.samples(self.model, self.tokenizer, self.test, self.cfg.model.max_length, self.device,
                                      self.cfg.model.max_new_tokens)

    def public_batches(self) -> Iterator[tuple[str, Batch]]:
        """(task, batch) over the server-held unlabelled sample of every task (none without per-task heads)."""
        return self.per_task.public_batches() if self.per_task is not None else iter(())

    def public_step(self) -> None:
        """The plugin's server-side step on public data, if it has one; updates the state."""
        if self.per_task is not None and self.per_task.public_step():
            self.state = self._global_state()


class MultiTaskHook(RoundHook):
    """Adds per-task results to each ``metrics.jsonl`` row, then runs the public-data step."""

    def __init__(self, setup: ServerSetup) -> None:
        self.setup = setup
        self.round_work: ServerRoundHook | None = None  # the plugin's, made on the first round's end

    def on_round_end(self, server_round: int, row: dict[str, Any], report: RoundReport) -> None:
        row.update(self.setup.last_eval)
        row.update(per_task_row(self.setup.tasks, self.setup.cfg.privacy.enabled, report))
        if report.released:
            self.setup.public_step()
        plugin = self.setup.plugin
        if self.round_work is None and isinstance(plugin, ServerRoundWork):  # method-specific server work
            self.round_work = plugin.server_round_hook(self.setup)
        if self.round_work is not None:
            row.update(self.round_work.round_end(server_round, report))
        metric = task_for(self.setup.cfg).primary_metric
        per_task = " ".join(f"{k}={v:.4f}" for k, v in row.get(f"{metric}_per_task", {}).items())
        log.info("round %d: per-task %s %s (mean %.4f)", server_round, metric, per_task, row[metric])
