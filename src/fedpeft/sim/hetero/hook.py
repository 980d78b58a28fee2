"""The emulator: assigns profiles, plans memory, applies deadlines, records simulated time.

:class:`HeteroEmulator` plugs into the real server loop twice:

* as the **round timer** of the deadline wrapper strategy
  (:class:`fedpeft.strategies.deadlines.DeadlineStrategy`; ``run_federation(round_timer=...)``):
  the base strategy selects more clients under over-selection, and every instruction carries
  one ``hetero-plan`` entry (:meth:`HeteroEmulator.round_directives`) -- every client's
  profile, its memory decision (physical batch, rank) and who is offline or declines this
  round; the simulator's ClientApp mod applies each client's own entry
  (:func:`fedpeft.sim.mods.hetero_mod`; a deployed node refuses the plan). The replies are
  turned into simulated timings and crash draws (:meth:`HeteroEmulator.time_replies`), the
  wrapper applies the deadline policy, and the emulator records the outcomes and zero-pads
  lower-rank B tensors of the accepted replies (:meth:`HeteroEmulator.record_outcomes`) --
  only those reach AdapterAvg, so stragglers and dropouts really change the model.
* as a :class:`~fedpeft.server.loop.RoundHook`: each ``metrics.jsonl`` row gets ``sim_seconds``
  (simulated round time) and ``sim_clock`` next to the real ``seconds``, plus counts per
  outcome; every client's phases go to ``hetero_timeline.jsonl`` (``estimated_compute_s``
  is the server's estimate of the host compute, ``compute_source`` says so; ``compute_s``
  is that scaled to the device); the plots are written at the end.

**Compute time comes from the server's cost model, never from the client.** A client's
wall time is a timing side channel in DP runs (it depends on its private Poisson batch
sizes and snippet lengths), so DP replies carry no ``seconds``. At the start the server
prices a step on its own model and held-out data
(:func:`fedpeft.sim.hetero.cost.measure_step_cost`); a client's host compute is that
price x the ``steps`` it reports x its expected batch (sample rate x ``num-examples``), see
:mod:`fedpeft.sim.hetero.timing`. The same model is used without DP (whose replies still
carry ``seconds``), so a reply is read for ``num-examples``, ``steps`` and ``sample-rate``
(and its tensors' sizes) only.

Client ids are simulation partition ids (``str(i)``), so the plan is a list indexed by them.

**Resume.** The emulator is a stateful hook (:meth:`HeteroEmulator.state_dict`): the checkpoint
keeps its simulated clock, rows and timeline, the server's step cost (measured once, on the
first start: re-measuring it would change every later simulated time), the profile assignment
and memory decisions, and a fingerprint of the scenario (refused on resume if another
scenario is given). Offline and crash draws need no saved generator: each is a pure function
of (seed, round, client) (:func:`fedpeft.strategies.deadlines.draw_round`). So a resumed run
continues bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

import fedpeft.wire as wire
from fedpeft.adapters import get as get_plugin
from fedpeft.adapters.capabilities import RankTiers
from fedpeft.adapters.ffa_lora_hetero import pad_state
from fedpeft.config import RunConfig
from fedpeft.io import atomic_write_text
from fedpeft.server.run_dir import RunDir
from fedpeft.server.setup import RoundHook, ServerSetup
from fedpeft.sim.hetero.memory import MemoryDecision, ModelShape, TrainShape, decide, model_shape
from fedpeft.sim.hetero.scenario import Scenario
from fedpeft.sim.hetero.timing import COMPUTE_SOURCE, ClientTiming, StepCost, client_timing, expected_batch
from fedpeft.strategies.adapter_avg import RoundReport
from fedpeft.strategies.deadlines import (
    Candidate,
    DeadlinePolicy,
    Outcome,
    TimedReplies,
    draw_round,
    settle_round,
)
from fedpeft.strategies.state import StateDict
from fedpeft.tasks.registry import task_for

__all__ = ["HeteroEmulator", "TIMELINE_FILE", "TimelineEntry"]

log = logging.getLogger("fedpeft.hetero")
TIMELINE_FILE = "hetero_timeline.jsonl"


@dataclass(frozen=True)
class TimelineEntry:
    """One selected client in one round (seconds from the round start).

    Every time is the emulation's: ``estimated_compute_s`` is the server's cost-model
    estimate of the compute on the host (``compute_source``), never a client measurement;
    ``compute_s`` is it scaled to the emulated device.
    """

    round: int
    client: str
    profile: str
    status: str  # accepted | late | surplus | crashed | offline | declined
    download_s: float
    compute_s: float
    upload_s: float
    end_s: float
    estimated_compute_s: float
    rank: int
    physical_batch: int
    bytes_up: int
    reason: str = ""
    steps: int = 0
    expected_batch: float = 0.0
    compute_source: str = COMPUTE_SOURCE


class HeteroEmulator(RoundHook):
    """Scenario-driven emulation of heterogeneous clients inside a real Flower run."""

    def __init__(self, scenario: Scenario, cfg: RunConfig, step_cost: StepCost | None = None) -> None:
        """``step_cost``: the price of a step; ``None`` = the server measures it in :meth:`on_start`."""
        self.scenario, self.cfg = scenario, cfg
        self.step_cost = step_cost
        self.assignment = scenario.assign(cfg.train.clients, cfg.seed)
        self.names = sorted(set(self.assignment))
        self.index = {n: i for i, n in enumerate(self.names)}
        profiles = [scenario.catalogue[n] for n in self.assignment]
        self.availability = [p.availability for p in profiles]
        self.crash_rate = [p.crash_rate for p in profiles]
        self.decisions: dict[str, MemoryDecision] = {}
        self.rows: list[dict[str, Any]] = []
        self.timeline: list[TimelineEntry] = []
        self.sim_clock = 0.0
        self.run_dir: Path | None = None
        self.full_shapes: dict[str, tuple[int, ...]] = {}
        self.k = cfg.train.clients_per_round or cfg.train.clients
        self._pending: dict[int, tuple[float, list[TimelineEntry]]] = {}
        self._plan: dict[str, Any] = {}
        self._resumed_decisions: dict[str, Any] | None = None  # set by load_state_dict, checked in on_start

    # ---- planning -----------------------------------------------------------------------
    def plan_memory(self, shape: ModelShape) -> dict[str, MemoryDecision]:
        """One memory decision per profile in use (same model, batch, sequence, DP)."""
        t, a = self.cfg.train, self.cfg.adapter
        tiers_supported = isinstance(get_plugin(a.method), RankTiers)  # else every client uses adapter.rank
        for name in self.names:
            rank = min(self.scenario.ranks.get(name, a.rank), a.rank) if tiers_supported else a.rank
            train = TrainShape(min(t.physical_batch_size, t.batch_size), self.cfg.model.max_length, rank,
                               tuple(a.target_modules), self.cfg.privacy.enabled, t.optimizer)
            tiers = self.scenario.rank_tiers if tiers_supported else ()
            self.decisions[name] = d = decide(self.scenario.catalogue[name], shape, train, tiers)
            if d.reason:
                log.info("memory: %s", d.reason)
        return self.decisions

    def _round_plan(self, server_round: int) -> str:
        draws = draw_round(self.cfg.seed, server_round, self.availability, self.crash_rate)
        skip: dict[str, str] = {}
        for cid, name in enumerate(self.assignment):
            d = self.decisions[name]
            if d.declined:
                skip[str(cid)] = d.reason
            elif draws.offline[cid]:
                skip[str(cid)] = f"offline this round (emulated {name}, availability {self.availability[cid]:g})"
        self._plan = {"draws": draws, "skip": skip}
        return wire.encode_hetero_plan(self.names, [self.index[n] for n in self.assignment],
                                       {n: (d.physical_batch, d.rank) for n, d in self.decisions.items()}, skip)

    # ---- RoundHook ----------------------------------------------------------------------
    def on_start(self, setup: ServerSetup, strategy: Strategy, run_dir: RunDir) -> None:
        self.run_dir = run_dir.path
        config = getattr(setup.model, "config", None)
        num_labels = int(getattr(config, "num_labels", 2))
        self.plan_memory(model_shape(config, num_labels, self.cfg.task_type, _weights_dtype(setup.model)))
        planned = {n: asdict(d) for n, d in self.decisions.items()}
        if self._resumed_decisions is not None and planned != self._resumed_decisions:
            raise ValueError("the checkpoint's memory plan differs from this run's (another model or scenario); "
                             "resume with the run's own configuration and scenario")
        self.full_shapes = {k: tuple(v.shape) for k, v in setup.state.items()}
        if self.step_cost is None:  # a resumed run has the measured one back (module doc)
            from fedpeft.sim.hetero.cost import measure_step_cost

            self.step_cost = measure_step_cost(setup)
        log.info("hetero compute model: %.3g host s per example-step (server-measured on %d held-out examples, "
                 "%s, %s); client timings are not used", self.step_cost.seconds_per_example, self.step_cost.batch,
                 "DP-SGD" if self.step_cost.dp else "no DP", self.step_cost.device or "set by hand")
        counts = Counter(self.assignment)
        log.info("hetero scenario %s: %s; deadline %s (%g s, over-select x%g); host %s",
                 self.scenario.name, ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())),
                 self.scenario.deadline.policy, self.scenario.deadline.deadline_s,
                 self.scenario.deadline.over_select, self.scenario.host_profile)
        # empty on a fresh start; exactly the checkpointed rounds on resume
        atomic_write_text(run_dir.path / TIMELINE_FILE, "".join(json.dumps(asdict(e)) + "\n" for e in self.timeline))
        (run_dir.path / "hetero_plan.json").write_text(json.dumps({
            "scenario": self.scenario.name, "assignment": self.assignment,
            "memory": {n: asdict(d) for n, d in self.decisions.items()},
            "deadline": asdict(self.scenario.deadline),
            "compute_cost": asdict(self.step_cost),
        }, indent=1, default=str), encoding="utf-8")

    def on_round_end(self, server_round: int, row: dict[str, Any], report: RoundReport) -> None:
        round_s, entries = self._pending.pop(server_round, (0.0, []))
        self.sim_clock += round_s
        counts = Counter(e.status for e in entries)
        row.update({
            "sim_seconds": round_s, "sim_clock": self.sim_clock,
            "hetero": {s: counts.get(s, 0) for s in ("accepted", "late", "surplus", "crashed", "offline", "declined")},
            "bytes_up_actual": int(sum(e.bytes_up for e in entries if e.status == "accepted")),
        })
        self.rows.append(row)
        self.timeline.extend(entries)
        if self.run_dir is not None:
            with (self.run_dir / TIMELINE_FILE).open("a", encoding="utf-8") as fh:
                for e in entries:
                    fh.write(json.dumps(asdict(e)) + "\n")
        log.info("round %d: simulated %.2f s (clock %.2f s) vs real %.2f s; %s", server_round, round_s,
                 self.sim_clock, row.get("seconds", math.nan), dict(counts))

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        if self.run_dir is None or not self.rows:
            return
        from fedpeft.sim.hetero.plots import write_plots

        try:
            paths = write_plots(self.rows, self.timeline, self.run_dir / "plots", task_for(self.cfg).primary_metric)
            log.info("hetero plots: %s", ", ".join(str(p) for p in paths))
        except Exception as exc:  # plotting must never hide the run's own result or error
            log.warning("hetero plots failed: %s", exc)

    # ---- state (checkpoints) ------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of everything of the scenario the emulation depends on (not in the config hash)."""
        sc = self.scenario
        used = sorted(set(self.assignment) | {sc.host_profile})
        blob = {"profiles": {n: asdict(sc.catalogue[n]) for n in used}, "counts": sc.counts,
                "distribution": sc.distribution, "ranks": sc.ranks, "rank_tiers": list(sc.rank_tiers),
                "deadline": asdict(sc.deadline), "host": sc.host_profile, "assignment": self.assignment}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def state_dict(self) -> StateDict:
        """Simulated clock, rows and timeline so far, the step cost, the memory plan, and the
        scenario's fingerprint (module doc: what a resume needs, and why no RNG state)."""
        return {
            "scenario": self.scenario.name, "fingerprint": self.fingerprint(), "assignment": list(self.assignment),
            "sim_clock": self.sim_clock, "step_cost": None if self.step_cost is None else asdict(self.step_cost),
            "decisions": {n: asdict(d) for n, d in self.decisions.items()},
            "rows": [dict(r) for r in self.rows], "timeline": [asdict(e) for e in self.timeline],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (ValueError when it is another scenario's)."""
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"the checkpoint was made with scenario {state['scenario']} ({state['fingerprint']}), "
                             f"this run's is {self.scenario.name} ({self.fingerprint()}); resume with the run's "
                             "own scenario")
        self.sim_clock = float(state["sim_clock"])
        self.step_cost = None if state["step_cost"] is None else StepCost(**state["step_cost"])
        self._resumed_decisions = dict(state["decisions"])
        self.rows = [dict(r) for r in state["rows"]]
        self.timeline = [TimelineEntry(**e) for e in state["timeline"]]

    # ---- round timer of the deadline wrapper (fedpeft.strategies.deadlines.RoundTimer) ----
    @property
    def policy(self) -> DeadlinePolicy:
        return self.scenario.deadline

    def round_directives(self, server_round: int) -> dict[str, str]:
        """The ``hetero-plan`` every instruction of the round carries (module doc)."""
        return {wire.HETERO_PLAN: self._round_plan(server_round)}

    def settle(self, server_round: int, replies: list[Message], bytes_down_each: int) -> list[Message]:
        """Simulate the round for ``replies`` under the scenario's own deadline policy (what the
        deadline wrapper does); return those the server aggregates (B padded)."""
        return settle_round(self, server_round, replies, bytes_down_each, self.k, self.policy)

    def time_replies(self, server_round: int, replies: list[Message], bytes_down_each: int) -> TimedReplies:
        """Each selected client's simulated finish (or crash, offline, decline) from its reply."""
        draws = self._plan["draws"]
        timed = _Timed([])
        for msg in replies:
            if msg.has_error():
                timed.passthrough.append(msg)
                continue
            status = msg.content.get(wire.STATUS)
            if isinstance(status, ConfigRecord) and status.get(wire.HETERO_SKIP):
                cid = str(status.get(wire.CLIENT))
                kind = "declined" if self.decisions[self.assignment[int(cid)]].declined else "offline"
                timed.candidates.append(Candidate(cid, math.inf, kind))
                timed.info[cid] = (None, (0, 0.0, 0.0), 0, str(status.get(wire.REASON, "")))
                continue
            conf = msg.content.get(wire.INFO)
            if not isinstance(conf, ConfigRecord) or not self._emulated(str(conf.get(wire.CLIENT, ""))):
                timed.passthrough.append(msg)  # not an emulated client (e.g. a DP-budget refusal)
                continue
            cid = str(conf[wire.CLIENT])
            metrics = next(v for v in msg.content.values() if isinstance(v, MetricRecord))
            arrays = next(v for v in msg.content.values() if isinstance(v, ArrayRecord))
            up = wire.record_nbytes(arrays)
            profile = self.scenario.catalogue[self.assignment[int(cid)]]
            work = self.compute_estimate(metrics)
            timing = client_timing(profile, self.scenario.host, work[2], bytes_down_each, up)
            if draws.crash[int(cid)]:
                timed.candidates.append(Candidate(cid, timing.total_s, "crashed",
                                                  crash_s=draws.crash_point[int(cid)] * timing.total_s))
            else:
                timed.candidates.append(Candidate(cid, timing.total_s))
            timed.info[cid] = (timing, work, up, "")
            timed.replies[cid] = msg
        return timed

    def record_outcomes(self, server_round: int, outcomes: list[Outcome], round_s: float,
                        timed: TimedReplies) -> list[Message]:
        """Keep the round's timeline for :meth:`on_round_end`; the accepted replies, B padded."""
        info = timed.info if isinstance(timed, _Timed) else {}
        kept: list[Message] = []
        entries = [self._entry(server_round, o, *info[o.client]) for o in outcomes]
        for o in outcomes:
            reply = timed.replies.get(o.client)
            if o.status == "accepted" and reply is not None:
                key = next(k for k, v in reply.content.items() if isinstance(v, ArrayRecord))
                record = reply.content[key]
                assert isinstance(record, ArrayRecord)
                reply.content[key] = wire.state_to_arrayrecord(pad_state(wire.arrayrecord_to_state(record),
                                                                         self.full_shapes))
                kept.append(reply)
        self._pending[server_round] = (round_s, sorted(entries, key=lambda e: int(e.client)))
        return kept

    def compute_estimate(self, metrics: MetricRecord) -> tuple[int, float, float]:
        """(steps, expected batch, estimated host compute seconds) of one reply.

        Reads only what DP replies may carry: ``num-examples`` (public by design), ``steps``
        and ``sample-rate`` (accounted); without ``steps`` the configured number for that many
        examples (``train.local_steps``, else ``local_epochs`` x batches per epoch = 1 / q, as
        the trainer's ``local_steps``). A client's ``seconds`` is never read (timing side
        channel; module doc).
        """
        if self.step_cost is None:
            raise RuntimeError("HeteroEmulator: no step cost; on_start measures it (or pass step_cost=)")
        def number(key: str) -> float | None:
            value = metrics.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        n = number(wire.NUM_EXAMPLES) or 0.0
        batch = expected_batch(n, self.cfg.train.batch_size, number(wire.SAMPLE_RATE))
        reported = number(wire.STEPS)
        if reported is not None:
            steps = int(reported)
        elif n >= 1:
            t = self.cfg.train
            steps = t.local_steps or max(1, math.ceil(t.local_epochs * round(n / batch)))  # n / batch = 1 / q
        else:
            steps = 0
        return steps, batch, self.step_cost.host_seconds(steps, batch)

    def _emulated(self, cid: str) -> bool:
        return cid.isdigit() and int(cid) < len(self.assignment)

    def _entry(self, server_round: int, o: Outcome, timing: ClientTiming | None, work: tuple[int, float, float],
               up: int, reason: str) -> TimelineEntry:
        name = self.assignment[int(o.client)]
        d = self.decisions[name]
        t = timing or ClientTiming(0.0, 0.0, 0.0)
        steps, batch, host_s = work
        if not reason and o.status != "accepted":
            reason = {"late": "finished after the deadline", "surplus": "over-selected; k clients already in",
                      "crashed": "crashed during the round (emulated)"}.get(o.status, "")
        return TimelineEntry(server_round, o.client, name, o.status, t.download_s, t.compute_s, t.upload_s, o.end_s,
                             estimated_compute_s=host_s, rank=d.rank, physical_batch=d.physical_batch, bytes_up=up,
                             reason=reason, steps=steps, expected_batch=batch)


def _weights_dtype(model: Any) -> str:
    """The dtype of the server model's frozen weights (``model.dtype`` as this host resolved
    it: the simulated clients build theirs the same way), e.g. ``float32``."""
    params = getattr(model, "parameters", None)  # a stand-in setup (tests) has no model weights
    frozen = (p.dtype for p in params() if not p.requires_grad) if callable(params) else iter(())
    return str(next(frozen, "float32")).removeprefix("torch.")


@dataclass
class _Timed(TimedReplies):
    """:class:`TimedReplies` plus what the emulator's timeline needs of each client."""

    info: dict[str, tuple[ClientTiming | None, tuple[int, float, float], int, str]] = field(default_factory=dict)
