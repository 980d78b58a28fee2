"""The server's round loop: send, validate, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs a fixed loop; fedpeft drives the same strategy calls
(``configure_train`` / ``aggregate_train`` through :func:`send_and_receive`) itself so
that every round ends with a central evaluation on the held-out test set, one
``metrics.jsonl`` row, one log summary line, and a checkpoint (:mod:`fedpeft.server.checkpoint`)
that ``--resume`` continues from. A round with fewer than ``faults.min_clients`` valid
replies is retried with the same global state or skipped (:mod:`fedpeft.sim.faults`).

:func:`send_and_receive` is Flower's ``Grid.send_and_receive`` with two changes: it pulls
replies every ``PULL_INTERVAL_S`` (Flower 1.42's deployed grid sleeps 3 s between pulls,
its simulation grid 0.1 s), and an error reply the SuperLink makes on behalf of a node
(node offline, message expired: its ``src_node_id`` is the SuperLink's own ID, 1) is
re-addressed from the node the instruction went to, so logs and ``metrics.jsonl`` name
the node that failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters import get as get_plugin
from fedpeft.config import RunConfig, config_hash, config_to_toml
from fedpeft.privacy.accounting import DEFAULT_RELATION
from fedpeft.server.checkpoint import Checkpoint, load_checkpoint, round_checkpoint, save_checkpoint
from fedpeft.server.run_dir import RunDir
from fedpeft.strategies.adapter_avg import AdapterAvg, RoundReport, state_to_arrayrecord
from fedpeft.strategies.validation import StateSpec
from fedpeft.tasks.model import load_tokenizer, pick_device
from fedpeft.tasks.registry import task_for

__all__ = ["PULL_INTERVAL_S", "RoundHook", "ServerSetup", "attribute_reply", "inner_strategy", "reported_epsilon",
           "run_federation", "send_and_receive"]

log = logging.getLogger("fedpeft.server")

PULL_INTERVAL_S = 0.5
"""Seconds between reply pulls on a deployed grid (Flower's own: 3 s; see module doc).
``FEDPEFT_PULL_INTERVAL`` in the ServerApp's environment overrides it (for benchmarks);
a grid with its own ``pull_interval`` (the simulation's, 0.1 s) keeps that."""


class RoundHook:
    """Extension point for the round loop (heterogeneous-client emulation, reliability,
    reporting). Every method is optional; ``on_round_end`` may add keys to ``row`` before it
    is written to ``metrics.jsonl``."""

    def on_start(self, setup: ServerSetup, strategy: Strategy, run_dir: RunDir) -> None:
        """Called once before round 1."""

    def on_round_end(self, server_round: int, row: dict[str, Any], report: RoundReport) -> None:
        """Called after aggregation and evaluation of each round."""

    def on_end(self, rows: list[dict[str, Any]]) -> None:
        """Called once after the last round (also after a failure, with the rows so far)."""


def inner_strategy(strategy: Strategy) -> AdapterAvg:
    """Unwrap Flower-style wrapper strategies (which keep the wrapped one as ``.strategy``)."""
    inner = strategy
    while not isinstance(inner, AdapterAvg):
        inner = inner.strategy  # type: ignore[attr-defined]
    return inner


class ServerSetup:
    """Server-side model, test data and initial global state for one configuration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.task_type = task_for(cfg)
        self.plugin = get_plugin(cfg.adapter.method)
        self.device = pick_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        pool, self.test = self.task_type.train_test_split(cfg.data, cfg.seed)
        base = self.task_type.build_model(cfg.model, self.task_type.num_outputs(pool), head_seed=cfg.adapter.seed)
        self.model = self.plugin.attach(base, cfg).to(self.device)
        self.state = {k: v.detach().cpu().numpy().copy() for k, v in self.plugin.trainable_state(self.model).items()}
        self.spec = StateSpec.from_state(self.state, self.plugin.frozen_fingerprint(self.model))

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.plugin.load_state(self.model, state)

    def evaluate(self) -> dict[str, float]:
        """The task type's metrics of the current global model on the held-out test set."""
        return self.task_type.evaluate(self.model, self.tokenizer, self.test, self.cfg.model.max_length, self.device)


def make_setup(cfg: RunConfig) -> ServerSetup:
    """:class:`ServerSetup`, or :class:`fedpeft.server.multitask.MultiTaskSetup` when ``[tasks]`` is set."""
    if cfg.tasks.enabled:
        from fedpeft.server.multitask import MultiTaskSetup

        return MultiTaskSetup(cfg)
    return ServerSetup(cfg)


def _round_row(
    cfg: RunConfig, report: RoundReport, ev: dict[str, float], eps: dict[str, float], accountants: set[str],
    seconds: float,
) -> dict[str, Any]:
    finite = [e for e in eps.values() if math.isfinite(e)]
    used = report.accepted if report.released else []  # replies that went into the average
    # Clients' training losses exist only without DP (a DP reply carries none: src/fedpeft/client/app.py).
    train_losses = [r.metrics["train-loss"] for r in used if "train-loss" in r.metrics]
    first_losses = [r.metrics["train-loss-first"] for r in used if "train-loss-first" in r.metrics]
    return {
        "round": report.server_round,
        **{name: ev[name] for name in task_for(cfg).metric_names},  # seq-cls: accuracy, loss
        "epsilon": max(finite) if (cfg.privacy.enabled and finite) else (0.0 if cfg.privacy.enabled else math.inf),
        "epsilon_per_client": dict(sorted(eps.items())),
        "epsilon_unit": "example-level, per client" if cfg.privacy.enabled else "no DP",
        "epsilon_relation": DEFAULT_RELATION if cfg.privacy.enabled else "none",
        "accountant": ",".join(sorted(accountants)) or "none",
        "delta": cfg.privacy.delta,
        "bytes_up": report.bytes_up,
        "bytes_down": report.bytes_down,
        "seconds": seconds,
        "train_loss": float(np.mean(train_losses)) if train_losses else None,  # None: nothing trained in
        "train_loss_first": float(np.mean(first_losses)) if first_losses else None,
        "clients_sent": report.sent_to,
        "clients_accepted": len(used),
        "attempts": report.attempt + 1,
        "skipped": not report.released,
        "rejected": report.rejected,
        "refused": report.refused,
        "failed": report.failed,
        "method": cfg.adapter.method,
    }


def reported_epsilon(msg: Message) -> tuple[str, float] | None:
    """``(client, epsilon spent)`` that a reply states (its metrics, or the status of a
    refusal or timeout), or None when it states none (errors, malformed values)."""
    if msg.has_error():
        return None
    content = msg.content
    status, info, metrics = content.get("status"), content.get("info"), content.get("metrics")
    who = next((str(r["client"]) for r in (info, status) if isinstance(r, ConfigRecord) and "client" in r), None)
    value = next((r["epsilon"] for r in (metrics, status) if isinstance(r, (MetricRecord, ConfigRecord))
                  and "epsilon" in r), None)
    if who is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    eps = float(value)
    return (who, eps) if eps >= 0 and not math.isnan(eps) else None


def _resume_from(ckpt_path: Path, cfg: RunConfig, setup: ServerSetup, strategy: Strategy, rd: RunDir) -> Checkpoint:
    """Restore server, strategy and ``metrics.jsonl`` from the last checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.config_hash != config_hash(cfg):
        raise ValueError(f"{ckpt_path}: checkpoint of configuration {ckpt.config_hash}, this run is "
                         f"{config_hash(cfg)}; resume with the run's own configuration")
    setup.set_state(ckpt.state)
    inner = inner_strategy(strategy)
    inner.previous = dict(ckpt.previous)
    if ckpt.rng_state is not None:
        inner.rng.setstate(ckpt.rng_state)
    rd.rewrite_metrics(ckpt.rows)  # drop a row written after the checkpoint, if the crash came in between
    log.info("resuming %s after round %d of %d (checkpoint %s)", rd.path, ckpt.server_round, cfg.train.rounds,
             ckpt_path.name)
    return ckpt


def attribute_reply(reply: Message, sent: dict[str, Message]) -> Message:
    """``reply`` as from the node its instruction went to: an error reply whose sender is
    not that node (the SuperLink answers for an offline node with ``src_node_id`` 1) is
    rebuilt with Flower's ``Message(error, reply_to=instruction)``; others are returned as is."""
    if not reply.has_error():
        return reply
    ins = sent.get(reply.metadata.reply_to_message_id)
    if ins is None or reply.metadata.src_node_id == ins.metadata.dst_node_id:
        return reply
    return Message(reply.error, reply_to=ins)


def _pull_interval(grid: Grid) -> float:
    own = getattr(grid, "pull_interval", None)
    if isinstance(own, (int, float)):
        return float(own)
    env = os.environ.get("FEDPEFT_PULL_INTERVAL", "")
    try:
        value = float(env) if env else PULL_INTERVAL_S
    except ValueError:
        raise ValueError(f"invalid FEDPEFT_PULL_INTERVAL={env!r}: seconds, e.g. 0.5") from None
    if not 0.01 <= value <= 60:
        raise ValueError(f"invalid FEDPEFT_PULL_INTERVAL={env!r}: between 0.01 and 60 seconds")
    return value


def send_and_receive(grid: Grid, messages: Sequence[Message], timeout: float,
                     pull_interval: float | None = None) -> list[Message]:
    """Push ``messages``, then pull replies every ``pull_interval`` seconds until each has
    one or ``timeout`` passes (as Flower's ``Grid.send_and_receive``); error replies are
    attributed to their node (:func:`attribute_reply`)."""
    interval = _pull_interval(grid) if pull_interval is None else pull_interval
    pending = {i for i in grid.push_messages(messages) if i}  # the grid sets each message's id
    sent = {m.metadata.message_id: m for m in messages}
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= end:
            break
        time.sleep(interval)
    return [attribute_reply(m, sent) for m in replies]


def _train_round(
    grid: Grid, cfg: RunConfig, setup: ServerSetup, strategy: Strategy, server_round: int, timeout: float,
) -> tuple[RoundReport, list[Any]]:
    """Send, receive and aggregate one round; retry it (same global state) while too few
    valid replies came back and ``faults.on_too_few = retry`` allows."""
    inner = inner_strategy(strategy)
    max_attempts = 1 + (cfg.faults.max_retries if cfg.faults.on_too_few == "retry" else 0)
    received: list[Any] = []  # every attempt's replies: each states what its client spent
    for attempt in range(max_attempts):
        inner.attempt = attempt
        messages = list(strategy.configure_train(server_round, state_to_arrayrecord(setup.state), ConfigRecord(),
                                                 grid))
        replies = send_and_receive(grid, messages, timeout)
        received.extend(replies)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        report = inner.report
        if arrays is not None:
            setup.set_state({k: v.numpy() for k, v in arrays.items()})
            return report, received
        if attempt + 1 < max_attempts:
            log.warning("round %d: retrying with the same global state (attempt %d of %d)",
                        server_round, attempt + 2, max_attempts)
    log.warning("round %d: skipped after %d attempt(s); global state unchanged", server_round, max_attempts)
    return report, received


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    timeout: float = 3600.0,
    hooks: Sequence[RoundHook] = (),
    wrap_strategy: Callable[[AdapterAvg], Strategy] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run ``cfg.train.rounds`` rounds on ``grid``; write the run directory; return the rows.

    ``wrap_strategy`` may wrap the :class:`AdapterAvg` in Flower-style wrapper strategies
    (e.g. client-level central DP, deadlines); ``hooks`` observe and annotate each round.
    A checkpoint is written after every round; ``resume=True`` continues from it.
    """
    rd = RunDir(run_dir)
    handler = rd.attach_log()
    rows: list[dict[str, Any]] = []
    try:
        rd.write_config(cfg)
        setup = make_setup(cfg)
        hooks = [*hooks, *getattr(setup, "hooks", [])]  # the multi-task setup brings its own
        base = getattr(setup, "strategy_class", AdapterAvg)(
            setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
            extra_config={"ledger-dir": str(rd.ledger_dir.resolve()),
                          # deployed nodes map their files' string labels with the server's list
                          "label-names": json.dumps(list(getattr(getattr(setup, "test", None), "label_names", ())))},
        )
        strategy: Strategy = wrap_strategy(base) if wrap_strategy else base
        strategy.summary()
        eps: dict[str, float] = {}
        accountants: set[str] = set()
        first = 1
        if resume:
            ckpt = _resume_from(rd.checkpoint_path, cfg, setup, strategy, rd)
            rows, eps, accountants, first = list(ckpt.rows), dict(ckpt.epsilon), set(ckpt.accountants), \
                ckpt.server_round + 1
        for hook in hooks:
            hook.on_start(setup, strategy, rd)
        dp = (f"DP-SGD epsilon={cfg.privacy.epsilon:g} delta={cfg.privacy.delta:g} clip={cfg.privacy.clip:g} "
              f"(example-level, per client, {DEFAULT_RELATION} neighbours, {cfg.privacy.accountant}; noise and "
              f"sampling from each node's own secret)") if cfg.privacy.enabled else "no DP"
        log.info("run %s: %s r=%d on %s, %d clients, %d rounds, %s; upload %d bytes/client",
                 rd.path, cfg.adapter.method, cfg.adapter.rank, ",".join(cfg.adapter.target_modules),
                 cfg.train.clients, cfg.train.rounds, dp, setup.spec.nbytes)
        for server_round in range(first, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            report, replies = _train_round(grid, cfg, setup, strategy, server_round, timeout)
            # Every client that trained has spent, whether its reply was then used, rejected,
            # cut off as late by a wrapper or lost to a timeout: read each reply received.
            for msg in replies:
                spent = reported_epsilon(msg)
                if spent is not None:
                    eps[spent[0]] = max(spent[1], eps.get(spent[0], 0.0))
                if not msg.has_error() and "info" in msg.content:
                    accountants.add(str(msg.content["info"].get("accountant", "none")))
            accountants.discard("none")
            ev = setup.evaluate()
            row = _round_row(cfg, report, ev, eps, accountants, time.perf_counter() - t0)
            for hook in hooks:
                hook.on_round_end(server_round, row, report)
            rows.append(row)
            rd.append_metrics(row)
            save_checkpoint(rd.checkpoint_path, round_checkpoint(  # released state only (central DP: noised)
                server_round, config_hash(cfg), setup.state, inner_strategy(strategy), rows, eps, sorted(accountants)))
            eps_txt = (f"epsilon={row['epsilon']:.3f} (max over clients; {row['epsilon_unit']}, "
                       f"{row['epsilon_relation']}, delta={cfg.privacy.delta:g}, {row['accountant']})") \
                if cfg.privacy.enabled else "no DP"
            skipped = " SKIPPED (too few valid replies)" if row["skipped"] else ""
            # DP replies carry no training loss (it stays on the nodes): only the server's own loss then
            train_txt = "" if row["train_loss"] is None else f" train_loss={row['train_loss']:.4f}"
            metrics_txt = " ".join(f"{name}={row[name]:.4f}" for name in setup.task_type.metric_names)
            log.info("round %d/%d: %s%s %s clients=%d/%d up=%dB down=%dB %.1fs%s",
                     server_round, cfg.train.rounds, metrics_txt, train_txt, eps_txt,
                     row["clients_accepted"], row["clients_sent"], row["bytes_up"], row["bytes_down"],
                     row["seconds"], skipped)
        setup.plugin.export(setup.model, rd.adapter_dir)
        log.info("final adapter written to %s", rd.adapter_dir)
        return rows
    finally:
        for hook in hooks:
            hook.on_end(rows)
        for name in ("fedpeft",):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
