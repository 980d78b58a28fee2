"""MultiTaskAvg: AdapterAvg for multi-task federations (per-task groups of tensors).

In a multi-task federation (:mod:`fedpeft.data.layout`, ``per_task`` layouts) a client sends the *shared* trainable
tensors (e.g. the task-agnostic adapter, a router) plus the tensors *owned by its task*
(its head, task-specific adapter modules) -- never another task's. Two things differ from
:class:`~fedpeft.strategies.adapter_avg.AdapterAvg`:

* **Validation per task.** :class:`MultiTaskSpec` holds one :class:`StateSpec` per task; a
  reply must match exactly one of them (names, shapes, dtypes, size, finiteness, frozen
  hash as usual), otherwise it is rejected.
* **Aggregation in groups.** Tensors are grouped by the set of clients that sent them; each
  group is aggregated by the adapter's own rule (``plugin.aggregate``) over exactly those
  clients, with their example counts as weights. So a shared tensor is averaged over every
  client and a task-owned one only within that task's group -- exact wherever the
  plugin's rule is (a key-wise weighted mean is). A tensor nobody sent this round (a task
  whose clients all failed, or a server-only tensor such as SMoRA's routing bias) keeps
  the value of the global state that was sent out.

The grouped rule itself is :func:`fedpeft.adapters.common.grouped_aggregate`; a plugin with
the :class:`~fedpeft.adapters.capabilities.MultiTaskAggregation` capability replaces it with
its own ``aggregate_multitask(states, weights, previous, current)`` (e.g. a gate trained
across groups). What the server learns: which task every client holds (from the tensor
names), as any per-task aggregation must.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft.adapters.capabilities import MultiTaskAggregation
from fedpeft.adapters.common import NDArrays, grouped_aggregate
from fedpeft.strategies.adapter_avg import AdapterAvg
from fedpeft.strategies.validation import Rejected, StateSpec

__all__ = ["MultiTaskAvg", "MultiTaskSpec", "grouped_aggregate"]


@dataclass(frozen=True)
class MultiTaskSpec(StateSpec):
    """The full global state's spec plus the spec of a reply from each task's clients."""

    task_specs: Mapping[str, StateSpec] = field(default_factory=dict)

    def task_of(self, names: Iterable[str]) -> str:
        """The task whose reply has exactly these tensor names (Rejected if none)."""
        got = set(names)
        for task, spec in self.task_specs.items():
            if set(spec.tensors) == got:
                return task
        raise Rejected(f"tensor names match no task's reply ({len(got)} tensors; tasks: "
                       f"{', '.join(self.task_specs)})")


class MultiTaskAvg(AdapterAvg):
    """AdapterAvg with per-task reply specs and per-group aggregation (see module doc)."""

    spec: MultiTaskSpec

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if not isinstance(self.spec, MultiTaskSpec):
            raise TypeError("MultiTaskAvg needs a MultiTaskSpec (a multi-task layout's fedpeft.server.setup.ServerSetup)")
        self.current: NDArrays = {}

    def summary(self) -> None:
        super().summary()
        from fedpeft.strategies.adapter_avg import log

        for task, spec in self.spec.task_specs.items():
            log.info("task %s: a client uploads %d tensors, %d bytes", task, len(spec.tensors), spec.nbytes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def reply_spec(self, content: RecordDict) -> StateSpec:
        records = [v for v in content.values() if isinstance(v, ArrayRecord)]
        if len(records) != 1:
            raise Rejected(f"expected exactly one ArrayRecord, found {len(records)}")
        return self.spec.task_specs[self.spec.task_of(records[0].keys())]

    def aggregate_states(self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> NDArrays:
        if isinstance(self.plugin, MultiTaskAggregation):
            return self.plugin.aggregate_multitask(states, weights, self.previous, self.current)
        return grouped_aggregate(self.plugin, states, weights, self.previous, self.current)
