"""The server's round loop: send, validate, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs a fixed loop; fedpeft drives the same strategy calls
(``configure_train`` / ``aggregate_train`` through :func:`send_and_receive`) itself so
that every round ends with a central evaluation on the held-out test set, one
``metrics.jsonl`` row, one log summary line, and a checkpoint (:mod:`fedpeft.server.checkpoint`)
that ``--resume`` continues from. A round with fewer than ``faults.min_clients`` valid
replies is retried with the same global state or skipped (:mod:`fedpeft.sim.faults`). The run
ends with ``report.html`` and its PNGs (:mod:`fedpeft.server.report`).

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

import fedpeft.wire as wire
from fedpeft.config import RunConfig, config_hash, config_to_toml
from fedpeft.privacy.accounting import DEFAULT_RELATION
from fedpeft.server.checkpoint import Checkpoint, load_checkpoint, restore, round_checkpoint, save_checkpoint
from fedpeft.server.run_dir import RunDir
from fedpeft.server.setup import RoundHook, ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg, RoundReport, state_to_arrayrecord
from fedpeft.strategies.deadlines import RoundTimer
from fedpeft.strategies.registry import build_strategy
from fedpeft.strategies.state import base_strategy
from fedpeft.tasks.registry import task_for

__all__ = ["PULL_INTERVAL_S", "RoundHook", "ServerSetup", "attribute_reply", "inner_strategy", "reported_epsilon",
           "run_federation", "send_and_receive"]

log = logging.getLogger("fedpeft.server")

PULL_INTERVAL_S = 0.5
"""Seconds between reply pulls on a deployed grid (Flower's own: 3 s; see module doc).
``FEDPEFT_PULL_INTERVAL`` in the ServerApp's environment overrides it (for benchmarks);
a grid with its own ``pull_interval`` (the simulation's, 0.1 s) keeps that."""


def inner_strategy(strategy: Strategy) -> AdapterAvg:
    """The base :class:`AdapterAvg` inside Flower-style wrappers (each keeps its inner one as ``.strategy``)."""
    return base_strategy(strategy, AdapterAvg)


def _round_row(
    cfg: RunConfig, report: RoundReport, ev: dict[str, float], eps: dict[str, float], accountants: set[str],
    seconds: float,
) -> dict[str, Any]:
    finite = [e for e in eps.values() if math.isfinite(e)]
    used = report.accepted if report.released else []  # replies that went into the average
    # Clients' training losses exist only without DP (a DP reply carries none: src/fedpeft/client/app.py).
    train_losses = [r.metrics[wire.TRAIN_LOSS] for r in used if wire.TRAIN_LOSS in r.metrics]
    first_losses = [r.metrics[wire.TRAIN_LOSS_FIRST] for r in used if wire.TRAIN_LOSS_FIRST in r.metrics]
    return {
        **_personal(used),
        "round": report.server_round,
        **{name: ev[name] for name in task_for(cfg).metric_names},  # seq-cls: accuracy, loss
        **{k: v for k, v in ev.items() if k.endswith("_per_task")},  # a task type's strata (causal-lm's tasks)
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


def _personal(used: Sequence[Any]) -> dict[str, Any]:
    """The clients' personalised evaluation (:mod:`fedpeft.client.personal_eval`), if this round
    carries one: the held-out-count-weighted mean of their accuracies (under DP each a noised
    release, left unclipped so the mean stays unbiased), the count and the clients."""
    got = [(float(r.metrics[wire.PERSONAL_ACCURACY]), float(r.metrics.get(wire.PERSONAL_EXAMPLES, 1.0)))
           for r in used if wire.PERSONAL_ACCURACY in r.metrics]
    if not got:
        return {}
    weight = sum(n for _, n in got)
    return {"personal_accuracy": sum(a * n for a, n in got) / weight, "personal_examples": int(weight),
            "personal_clients": len(got)}


def reported_epsilon(msg: Message) -> tuple[str, float] | None:
    """``(client, epsilon spent)`` that a reply states (its metrics, or the status of a
    refusal or timeout), or None when it states none (errors, malformed values)."""
    if msg.has_error():
        return None
    content = msg.content
    status, info, metrics = content.get(wire.STATUS), content.get(wire.INFO), content.get(wire.METRICS)
    who = next((str(r[wire.CLIENT]) for r in (info, status) if isinstance(r, ConfigRecord) and wire.CLIENT in r), None)
    value = next((r[wire.EPSILON] for r in (metrics, status) if isinstance(r, (MetricRecord, ConfigRecord))
                  and wire.EPSILON in r), None)
    if who is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    eps = float(value)
    return (who, eps) if eps >= 0 and not math.isnan(eps) else None


def _resume_from(ckpt_path: Path, cfg: RunConfig, setup: ServerSetup, strategy: Strategy,
                 hooks: Sequence[RoundHook], rd: RunDir) -> Checkpoint:
    """Restore server, strategy chain, stateful hooks and ``metrics.jsonl`` from the last checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.config_hash != config_hash(cfg):
        raise ValueError(f"{ckpt_path}: checkpoint of configuration {ckpt.config_hash}, this run is "
                         f"{config_hash(cfg)}; resume with the run's own configuration")
    setup.set_state(ckpt.state)
    restore(ckpt, strategy, hooks)
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
                     pull_interval: float | None = None,
                     on_reply: Callable[[int, int], None] | None = None) -> list[Message]:
    """Push ``messages``, then pull replies every ``pull_interval`` seconds until each has
    one or ``timeout`` passes (as Flower's ``Grid.send_and_receive``); error replies are
    attributed to their node (:func:`attribute_reply`). ``on_reply(received, sent)`` is called
    once after the push and whenever more replies arrived (progress)."""
    interval = _pull_interval(grid) if pull_interval is None else pull_interval
    pending = {i for i in grid.push_messages(messages) if i}  # the grid sets each message's id
    sent = {m.metadata.message_id: m for m in messages}
    end = time.monotonic() + timeout
    replies: list[Message] = []
    if on_reply is not None:
        on_reply(0, len(sent))
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        if got and on_reply is not None:
            on_reply(len(replies), len(sent))
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= end:
            break
        time.sleep(interval)
    return [attribute_reply(m, sent) for m in replies]


def _progress_writer(rd: RunDir, server_round: int, attempt: int) -> Callable[[int, int], None]:
    return lambda got, sent: rd.write_progress(server_round, attempt, got, sent)


def _train_round(
    grid: Grid, cfg: RunConfig, setup: ServerSetup, strategy: Strategy, server_round: int, timeout: float,
    rd: RunDir | None = None,
) -> tuple[RoundReport, list[Any]]:
    """Send, receive and aggregate one round; retry it (same global state) while too few
    valid replies came back and ``faults.on_too_few = retry`` allows."""
    inner = inner_strategy(strategy)
    max_attempts = 1 + (cfg.faults.max_retries if cfg.faults.on_too_few == "retry" else 0)
    received: list[Any] = []  # every attempt's replies: each states what its client spent
    for attempt in range(max_attempts):
        messages = list(strategy.configure_train(server_round, state_to_arrayrecord(setup.state),
                                                 ConfigRecord({wire.ATTEMPT: attempt}), grid))
        progress = None if rd is None else _progress_writer(rd, server_round, attempt)
        replies = send_and_receive(grid, messages, timeout, on_reply=progress)
        received.extend(replies)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        report = inner.round_report()
        if arrays is not None:
            setup.set_state({k: v.numpy() for k, v in arrays.items()})
            return report, received
        if attempt + 1 < max_attempts:
            log.warning("round %d: retrying with the same global state (attempt %d of %d)",
                        server_round, attempt + 2, max_attempts)
    log.warning("round %d: skipped after %d attempt(s); global state unchanged", server_round, max_attempts)
    return report, received


def _strategy_for(
    cfg: RunConfig, setup: ServerSetup, rd: RunDir, round_timer: RoundTimer | None,
    wrap_strategy: Callable[[Strategy], Strategy] | None,
) -> tuple[Strategy, list[Any]]:
    """The run's strategy chain (:func:`fedpeft.strategies.registry.build_strategy`: the base named
    by ``[strategy]``; deadlines when a ``round_timer`` -- a heterogeneous-device emulation, also
    one of the hooks -- is given; the caller's ``wrap_strategy``; central DP outermost when
    configured) and the round hooks its wrappers bring (the client-level accountant, a duck-typed
    :class:`RoundHook`)."""
    strategy, wrapper_hooks = build_strategy(
        cfg, setup.plugin, setup.spec, config_to_toml(cfg), config_hash(cfg),
        extra_config={wire.LEDGER_DIR: str(rd.ledger_dir.resolve()),
                      # deployed nodes map their files' string labels with the server's list
                      wire.LABEL_NAMES: json.dumps(list(setup.test.label_names))},
        round_timer=round_timer, extra=wrap_strategy,
    )
    return strategy, list(wrapper_hooks)


def _write_report(rd: RunDir) -> None:
    """``report.html`` of the run; a failure (even to import matplotlib) is one log line, never the run's.
    ``FEDPEFT_REPORT=0`` in the ServerApp's environment skips it (benchmarks timing the rounds alone)."""
    if os.environ.get("FEDPEFT_REPORT", "1") == "0":
        return
    try:
        from fedpeft.server.report import write_report_safely  # matplotlib: only now, after the last round
    except ImportError as exc:
        log.warning("report not written (%s)", exc)
        return
    write_report_safely(rd.path)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    timeout: float = 3600.0,
    hooks: Sequence[RoundHook] = (),
    wrap_strategy: Callable[[Strategy], Strategy] | None = None,
    resume: bool = False,
    round_timer: RoundTimer | None = None,
) -> list[dict[str, Any]]:
    """Run ``cfg.train.rounds`` rounds on ``grid``; write the run directory; return the rows.

    The strategy chain is :func:`_strategy_for`'s; ``hooks`` observe and annotate each round. A
    checkpoint of every component is written after every round; ``resume=True`` continues from it.
    """
    cfg = task_for(cfg).resolve_config(cfg)  # host-dependent "auto"s: decided here, sent to every client
    rd = RunDir(run_dir)
    handler = rd.attach_log()
    rows: list[dict[str, Any]] = []
    try:
        rd.write_config(cfg)
        setup = ServerSetup(cfg)
        strategy, wrapper_hooks = _strategy_for(cfg, setup, rd, round_timer, wrap_strategy)
        hooks = [*hooks, *wrapper_hooks, *setup.hooks]  # a multi-task layout brings its per-task rows
        strategy.summary()
        eps: dict[str, float] = {}
        accountants: set[str] = set()
        first = 1
        if resume:
            ckpt = _resume_from(rd.checkpoint_path, cfg, setup, strategy, hooks, rd)
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
            report, replies = _train_round(grid, cfg, setup, strategy, server_round, timeout, rd)
            # Every client that trained has spent, whether its reply was then used, rejected,
            # cut off as late by a wrapper or lost to a timeout: read each reply received.
            for msg in replies:
                spent = reported_epsilon(msg)
                if spent is not None:
                    eps[spent[0]] = max(spent[1], eps.get(spent[0], 0.0))
                if not msg.has_error() and wire.INFO in msg.content:
                    accountants.add(str(msg.content[wire.INFO].get(wire.ACCOUNTANT, "none")))
            accountants.discard("none")
            ev = setup.evaluate()
            row = _round_row(cfg, report, ev, eps, accountants, time.perf_counter() - t0)
            for hook in hooks:
                hook.on_round_end(server_round, row, report)
            rows.append(row)
            # checkpoint, then row: nothing from an uncheckpointed release is written (fedpeft.strategies.central_dp)
            save_checkpoint(rd.checkpoint_path, round_checkpoint(  # released state only (central DP: noised)
                server_round, config_hash(cfg), setup.state, strategy, rows, eps, sorted(accountants), hooks))
            rd.append_metrics(row)
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
        if rows:  # also after a failure part-way: the rounds that finished
            _write_report(rd)
        for name in ("fedpeft",):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
