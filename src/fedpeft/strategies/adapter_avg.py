"""AdapterAvg: Flower FedAvg whose aggregation rule belongs to the adapter plugin.

It subclasses Flower's :class:`~flwr.serverapp.strategy.FedAvg` for the strategy interface
(the wrappers, evaluation and summary), but does its own round set-up: ``configure_train``
waits (bounded by ``node_wait_s``) for enough nodes, samples them with its own
``random.Random(seed)`` over the sorted node ids (reproducible, and restored on resume), and
builds each node's message itself; FedAvg's ``configure_train`` and ``aggregate_train`` are
never called. What else differs:

* every round's ``ConfigRecord`` carries the resolved run configuration, its hash and
  the hash of the shared frozen tensors (FFA-LoRA's A), so clients can check both;
* each reply is validated on its own (:mod:`fedpeft.strategies.validation`): errors, budget
  refusals and invalid replies are logged with their reason and left out, and the round
  goes on with the rest (Flower's FedAvg would raise on one inconsistent reply);
* a round needs ``faults.min_clients`` valid replies; with fewer nothing is averaged in
  (the loop in :mod:`fedpeft.server.loop` retries or skips the round);
* aggregation calls ``plugin.aggregate`` (FFA-LoRA: weighted mean of B, exact) over the
  replies sorted by client id (so the floating-point sum, and a resumed run, do not depend
  on the order replies arrive in), then ``plugin.server_step``;
* a :class:`RoundReport` records bytes, per-client metrics and rejections for the
  server's ``metrics.jsonl``. DP replies carry no training loss (it would be an unaccounted
  release of the client's data); the aggregate's ``train-loss`` exists only without DP.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

import fedpeft.wire as wire
from fedpeft.adapters.base import AdapterPlugin, NDArrays
from fedpeft.config import RunConfig
from fedpeft.strategies.state import StateDict, sampler_from_json, sampler_to_json
from fedpeft.strategies.validation import Rejected, StateSpec, ValidatedReply, validate_reply
from fedpeft.wire import state_nbytes, state_to_arrayrecord

__all__ = ["AdapterAvg", "RoundReport", "state_to_arrayrecord", "state_nbytes"]

log = logging.getLogger("fedpeft.server")


@dataclass
class RoundReport:
    """What happened in one round, for metrics and logs."""

    server_round: int
    sent_to: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    accepted: list[ValidatedReply] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client/node -> reason
    refused: dict[str, str] = field(default_factory=dict)  # budget refusals
    failed: dict[str, str] = field(default_factory=dict)  # client errors and timeouts
    attempt: int = 0  # 0 = first try of this round; >0 = retry (faults.on_too_few = retry)
    released: bool = False  # a new global state was aggregated from the accepted replies


def _who(msg: Message) -> str:
    """Name a reply's sender for logs: its client id when it says one, else its node id."""
    node = f"node-{msg.metadata.src_node_id}"
    if msg.has_error():
        return node
    for value in msg.content.values():
        if isinstance(value, ConfigRecord) and wire.CLIENT in value:
            return f"client-{value[wire.CLIENT]!s}"
    return node


def _client_order(client: str) -> tuple[int, int | str]:
    """Numeric client ids in numeric order, then any others by name."""
    return (0, int(client)) if client.isdigit() else (1, client)


class AdapterAvg(FedAvg):
    """FedAvg sampling + per-reply validation + the adapter plugin's aggregation rule.

    Built from primitives (:meth:`from_config` reads them off a run configuration):
    ``clients_per_round`` sampled each round (with ``random.Random(seed)``, over the sorted
    node ids), at least ``min_replies`` valid replies for a round to be averaged, and what every
    instruction carries besides the round, the frozen hash and the attempt: the resolved
    configuration ``config_toml``, its hash and ``extra_config``. ``plugin_cfg`` is the run
    configuration the plugin's ``server_step`` is called with. The loop says which attempt of
    a round it sends in the ``config`` it passes to :meth:`configure_train` (key ``attempt``;
    default 0).

    State (:meth:`state_dict`): ``previous``, the last *released* global state, which the
    plugin's next ``aggregate`` sees (TriAdaptLoRA keeps its rank masks there), and the client
    sampler's RNG. A wrapper that changes the release (central DP adds noise) calls
    :meth:`defer_release` once and :meth:`keep_release` with each release, so the base never
    keeps an aggregate that was not released.
    """

    # Client-level central DP (strategies.central_dp) noises what this strategy returns and
    # keeps that release as the next round's state: sound only when nothing of the strategy
    # holds an un-noised aggregate across rounds. A subclass that keeps such state (a server
    # optimiser's moments) sets False; fedpeft.load refuses it with central DP.
    central_dp_compatible: ClassVar[bool] = True

    def __init__(
        self,
        plugin: AdapterPlugin,
        spec: StateSpec,
        *,
        clients_per_round: int,
        plugin_cfg: RunConfig,
        min_replies: int = 1,
        seed: int = 0,
        config_toml: str = "",
        config_hash: str = "",
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round, weighted_by_key=wire.NUM_EXAMPLES,
        )
        self.plugin, self.spec, self.cfg = plugin, spec, plugin_cfg
        self.config_toml, self.config_hash = config_toml, config_hash
        self.extra_config = dict(extra_config or {})
        self.per_round = clients_per_round
        self.min_replies = min_replies
        self.rng = random.Random(seed)
        self.report = RoundReport(0)
        self.previous: NDArrays = {}
        self._release_from_wrapper = False  # see defer_release
        self.node_wait_s = 300.0

    @classmethod
    def from_config(
        cls, plugin: AdapterPlugin, cfg: RunConfig, spec: StateSpec, config_toml: str, config_hash: str,
        extra_config: Mapping[str, str] | None = None, clients_per_round: int = 0,
    ) -> Self:
        """The strategy of run configuration ``cfg``: ``train.clients_per_round`` (or all; a
        deadline wrapper may ask for more), ``faults.min_clients``, ``seed``; every instruction
        carries the resolved configuration ``config_toml``, its hash and ``extra_config``."""
        return cls(plugin, spec, clients_per_round=clients_per_round or cfg.train.clients_per_round or cfg.train.clients,
                   plugin_cfg=cfg, min_replies=cfg.faults.minimum(), seed=cfg.seed, config_toml=config_toml,
                   config_hash=config_hash, extra_config=extra_config, **cls.config_primitives(cfg))

    @classmethod
    def config_primitives(cls, cfg: RunConfig) -> dict[str, Any]:
        """A subclass's own constructor arguments built from ``cfg`` (none here)."""
        return {}

    def summary(self) -> None:
        log.info("AdapterAvg(%s): %d clients per round, exact averaging: %s",
                 self.plugin.name, self.per_round, self.plugin.exact_average)

    # ---- state (checkpoints) ---------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """The released state the next aggregation sees and the client sampler's RNG state."""
        return {"previous": {k: np.array(v, copy=True) for k, v in self.previous.items()},
                "sampler": sampler_to_json(self.rng.getstate())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        previous = state["previous"]
        if not isinstance(previous, Mapping) or not all(isinstance(v, np.ndarray) for v in previous.values()):
            raise ValueError("AdapterAvg state: previous must map names to arrays")
        self.rng.setstate(sampler_from_json(state["sampler"]))
        self.previous = {str(k): np.array(v, copy=True) for k, v in previous.items()}

    # ---- what the loop and wrappers ask -----------------------------------------------------
    def round_report(self) -> RoundReport:
        """What happened in the round last configured (bytes, accepted, rejected, failed)."""
        return self.report

    def defer_release(self) -> None:
        """From now on a wrapper sets what is kept as ``previous`` (:meth:`keep_release`);
        the base's own aggregate is never kept (central DP: it is the un-noised one)."""
        self._release_from_wrapper = True

    def keep_release(self, state: NDArrays) -> None:
        """Keep ``state``, the round's release, as ``previous``."""
        self.previous = dict(state)

    # ---- Flower Strategy ---------------------------------------------------------------------
    def round_config(self, server_round: int, attempt: int = 0) -> ConfigRecord:
        return wire.RoundConfig(server_round, self.config_toml, self.config_hash, self.spec.frozen_hash,
                                attempt).to_record(self.extra_config)

    def _wait_for_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Wait (bounded by ``node_wait_s``) until enough nodes are connected."""
        deadline = time.monotonic() + self.node_wait_s
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < self.per_round and time.monotonic() < deadline:
            log.info("round %d: waiting for nodes (%d/%d connected)", server_round, len(node_ids), self.per_round)
            time.sleep(1.0)
            node_ids = sorted(grid.get_node_ids())
        return node_ids

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raw = config.get(wire.ATTEMPT, 0)
        attempt = raw if isinstance(raw, int) else 0
        node_ids = self._wait_for_nodes(grid, server_round)
        if len(node_ids) < self.per_round:
            log.warning("round %d: only %d nodes connected, %d wanted", server_round, len(node_ids), self.per_round)
        chosen = node_ids if self.per_round >= len(node_ids) else sorted(self.rng.sample(node_ids, self.per_round))
        record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: self.round_config(server_round, attempt)})
        self.report = RoundReport(server_round, sent_to=len(chosen), attempt=attempt)
        self.report.bytes_down = wire.record_nbytes(arrays) * len(chosen)
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=nid) for nid in chosen]

    def reply_spec(self, content: RecordDict) -> StateSpec:
        """The spec a reply must match (one for all here; per task in MultiTaskAvg)."""
        return self.spec

    def aggregate_states(self, states: list[NDArrays], weights: list[float]) -> NDArrays:
        """The adapter's aggregation rule over the accepted states (grouped in MultiTaskAvg)."""
        return self.plugin.aggregate(states, weights, self.previous)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.report
        for msg in replies:
            node = _who(msg)
            if msg.has_error():
                report.failed[node] = str(msg.error.reason).strip().splitlines()[-1][:300]
                log.warning("round %d: %s failed: %s", server_round, node, report.failed[node])
                continue
            content = msg.content
            status = content.get(wire.STATUS)
            if isinstance(status, ConfigRecord) and status.get(wire.TIMED_OUT):
                who = str(status.get(wire.CLIENT, node))
                report.failed[who] = str(status.get(wire.REASON, "timed out"))
                log.warning("round %d: client %s timed out: %s", server_round, who, report.failed[who])
                continue
            if isinstance(status, ConfigRecord) and status.get(wire.REFUSED):
                who = str(status.get(wire.CLIENT, node))
                report.refused[who] = str(status.get(wire.REASON, "budget"))
                log.warning("round %d: client %s refused: %s", server_round, who, report.refused[who])
                continue
            for value in content.values():
                if isinstance(value, ArrayRecord):
                    report.bytes_up += wire.record_nbytes(value)
            try:
                report.accepted.append(validate_reply(content, self.reply_spec(content)))
            except Rejected as exc:
                report.rejected[node] = str(exc)
                log.warning("round %d: rejected reply from %s: %s", server_round, node, exc)
        need = self.min_replies
        if len(report.accepted) < need:
            log.warning("round %d: %d valid replies, %d needed (faults.min_clients); nothing averaged in",
                        server_round, len(report.accepted), need)
            return None, None
        report.accepted.sort(key=lambda r: _client_order(r.client))
        report.released = True
        states = [r.state for r in report.accepted]
        weights = [r.weight for r in report.accepted]
        new_state = self.aggregate_states(states, weights)
        new_state = self.plugin.server_step(server_round, new_state, self.cfg)
        if not self._release_from_wrapper:
            self.keep_release(new_state)
        total = float(sum(weights))
        metrics = MetricRecord({wire.NUM_EXAMPLES: total, "clients": len(report.accepted)})
        if all(wire.TRAIN_LOSS in r.metrics for r in report.accepted):  # runs without DP only (module doc)
            metrics[wire.TRAIN_LOSS] = sum(float(r.metrics[wire.TRAIN_LOSS]) * r.weight for r in report.accepted) / total
        return state_to_arrayrecord(new_state), metrics
