"""The fedpeft ClientApp: one round of local (DP-)training per TRAIN message.

Per round the client
1. parses the configuration the server sent (cached by hash) and finds its own data
   (simulation: its partition of the pool; deployment: ``data-path`` in its node config);
2. checks the hash of its locally generated frozen tensors (FFA-LoRA's A) against the
   server's -- a mismatch is an error, never tolerated;
3. loads its privacy ledger (disk + ``Context.state``); on first use calibrates sigma for
   all steps it will take in the run; refuses to train if this round would exceed its
   epsilon budget (the reply says so and carries no weights);
4. trains, appends the round to its ledger and replies with exactly the plugin's
   trainable state plus metrics (examples, loss, epsilon spent, seconds, bytes).

A round that is re-run with the same inputs (a retry, or a resume after a server crash)
reproduces the same update; the ledger then records it as a replay, not as new spending
(:meth:`privacy.ledger.Ledger.record`). In simulation ``faults.fail_rate`` injects seeded
crashes and timeouts (:mod:`simulations.faults`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.runtime import ClientIdentity, Runtime, runtime_for
from fl_client.trainer import build_loader, loader_sample_rate, local_steps, tensorize, train_local
from privacy.accounting import calibrate_noise
from privacy.ledger import BudgetExceeded, Ledger
from privacy.plan import sample_rate_for
from simulations.faults import InjectedCrash, draw_fault
from strategies.adapter_avg import state_nbytes, state_to_arrayrecord
from task.config import RunConfig

__all__ = ["app", "handle_train"]

log = logging.getLogger("fedpeft.client")
app = ClientApp()

LEDGER_STATE_KEY = "fedpeft-ledger"
LOCAL_STATE_KEY = "fedpeft-local"


def _ledger(rt: Runtime, ident: ClientIdentity, context: Context, n_examples: int, steps_per_round: int) -> Ledger:
    cfg = rt.cfg
    state = context.state.get(LEDGER_STATE_KEY)
    state_json = str(state["json"]) if isinstance(state, ConfigRecord) and "json" in state else None
    ledger = Ledger.load_or_new(
        ident.ledger_dir / f"client-{ident.client_id}.json", state_json,
        client=ident.client_id, target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )
    if ledger.noise_multiplier == 0.0:
        # Calibrate once for every step this client will take in the whole run.
        q = sample_rate_for(n_examples, cfg.train.batch_size)
        plan = calibrate_noise(cfg.privacy.epsilon, cfg.privacy.delta, q, steps_per_round * cfg.train.rounds,
                               cfg.privacy.accountant)
        ledger.noise_multiplier, ledger.sample_rate = plan.noise_multiplier, plan.sample_rate
        ledger.planned_steps, ledger.accountant = plan.planned_steps, plan.accountant
        log.info("client %s: sigma=%.4f calibrated for %d steps at q=%.5f (epsilon=%.3f, delta=%g, %s)",
                 ident.client_id, plan.noise_multiplier, plan.planned_steps, q, plan.epsilon,
                 cfg.privacy.delta, plan.accountant)
    return ledger


def _save_ledger(ledger: Ledger, ident: ClientIdentity, context: Context) -> None:
    ledger.save(ident.ledger_dir / f"client-{ident.client_id}.json")
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})


def _digest(*parts: str | Mapping[str, np.ndarray]) -> str:
    """SHA-256 over strings and named arrays (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode() + b"\0")
            continue
        for name in sorted(part):
            arr = np.ascontiguousarray(part[name])
            h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def node_budget_refusal(node_config: Mapping[str, Any], cfg: RunConfig, ledger: Ledger | None, steps: int,
                        server_round: int) -> str:
    """Why this node refuses the run under its own cap ``max-epsilon`` (node config), or "".

    A deployed node's owner caps what may ever be spent on its data, whatever the server
    asks for. The check is on the run's plan: the node's ledger (all its history on this
    disk) plus this round and every remaining round at the run's sigma; a run without DP
    is refused outright by a capped node.
    """
    raw = node_config.get("max-epsilon")
    if raw is None or str(raw).strip() == "":
        return ""
    try:
        cap = float(str(raw))
    except (TypeError, ValueError):
        return f"node config max-epsilon={raw!r} is not a number; refusing to train"
    if ledger is None:
        return f"this node allows at most epsilon={cap:g} and the run has no DP (privacy.epsilon=inf)"
    remaining = steps * (cfg.train.rounds - server_round + 1)
    planned, acc = ledger.epsilon_if(remaining)
    if planned > cap:
        return (f"client {ledger.client}: the run's plan (rounds {server_round}..{cfg.train.rounds}, {remaining} steps "
                f"at sigma={ledger.noise_multiplier:.4f}) would reach epsilon={planned:.3f} > this node's cap "
                f"max-epsilon={cap:g} (example-level, delta={ledger.delta:g}, {acc})")
    return ""


def _refusal(msg: Message, **status: Any) -> Message:
    return Message(content=RecordDict({"status": ConfigRecord(status)}), reply_to=msg)


def _hetero_directive(conf: ConfigRecord, partition_id: int | None) -> dict[str, Any]:
    """This client's entry of the heterogeneous-device plan (simulations/hetero), if any:
    its emulated profile, the physical batch / rank its memory allows, and a reason to skip
    this round (offline, or its device cannot fit the model)."""
    raw = str(conf.get("hetero-plan", "") or "")
    if not raw or partition_id is None:
        return {}
    plan = json.loads(raw)
    profile = plan["profiles"][plan["assign"][partition_id]]
    return {"profile": profile, **plan["plan"][profile], "skip": plan["skip"].get(str(partition_id), "")}


def handle_train(msg: Message, context: Context) -> Message:
    """Pure function of (message, context) so tests can call it without Flower's runtime."""
    conf: ConfigRecord = msg.content.config_records["config"]
    rt = runtime_for(str(conf["fedpeft-config"]), str(conf["config-hash"]))
    cfg, plugin = rt.cfg, rt.plugin
    server_round = int(conf["server-round"])  # type: ignore[arg-type]
    ident = ClientIdentity.from_node(dict(context.node_config), dict(conf))
    data = rt.data_for(ident, dict(context.node_config))
    hetero = _hetero_directive(conf, ident.partition_id)
    if hetero.get("skip"):
        return _refusal(msg, refused=True, **{"hetero-skip": True}, reason=hetero["skip"], client=ident.client_id)
    attempt = int(conf.get("attempt", 0))  # type: ignore[arg-type]
    fault = draw_fault(cfg.faults.fail_rate, cfg.seed, server_round, attempt, ident.client_id) \
        if ident.partition_id is not None else ""
    if fault == "crash":
        raise InjectedCrash(f"client {ident.client_id}: injected crash in round {server_round} attempt {attempt} "
                            f"(faults.fail_rate={cfg.faults.fail_rate:g})")
    if hetero:  # smaller physical batch = Opacus virtual steps; the logical batch (and DP) is unchanged
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, physical_batch_size=int(hetero["physical_batch"])))

    with rt.lock:
        model = rt.model
        rt.activate(model, ident)
        local_hash = plugin.frozen_fingerprint(model)
        expected = str(conf.get("frozen-hash", ""))
        if expected != local_hash:
            raise RuntimeError(
                f"client {ident.client_id}: frozen-tensor hash mismatch (local {local_hash[:12]} != server "
                f"{expected[:12]}); the adapter seed or code differs from the server's"
            )
        incoming = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        plugin.load_state(model, incoming)
        if hetero and hasattr(plugin, "set_client_rank"):
            plugin.set_client_rank(model, int(hetero["rank"]))
        # Client-local tensors (e.g. ABMLL's posterior): restored per client, since one cached
        # model serves several virtual clients in simulation; empty = fresh client (reset).
        local = context.state.get(LOCAL_STATE_KEY)
        local_in = {k: v.numpy() for k, v in local.items()} if isinstance(local, ArrayRecord) else {}
        plugin.load_local_state(model, local_in)
        steps = local_steps(cfg, len(data))
        seed = cfg.seed * 1_000_003 + server_round * 7919 + (ident.partition_id or 0)
        # Everything this round's update is a function of: same key + same output = a replay.
        replay_key = _digest(str(conf["config-hash"]), f"{server_round}|{ident.client_id}|{seed}|{steps}",
                             json.dumps(hetero, sort_keys=True, default=str), incoming, local_in)
        sigma: float | None = None
        epsilon = 0.0
        ledger = None
        if cfg.privacy.enabled:
            ledger = _ledger(rt, ident, context, len(data), steps)
            replay = ledger.replay_of(server_round, replay_key)
            try:
                if replay is None:
                    ledger.check_budget(steps)
                    capped = node_budget_refusal(context.node_config, cfg, ledger, steps, server_round)
                    if capped:
                        raise BudgetExceeded(capped)
            except BudgetExceeded as exc:
                _save_ledger(ledger, ident, context)
                log.warning("%s", exc)
                return _refusal(msg, refused=True, reason=str(exc), client=ident.client_id)
            sigma = ledger.noise_multiplier
        elif reason := node_budget_refusal(context.node_config, cfg, None, steps, server_round):
            log.warning("client %s: %s", ident.client_id, reason)
            return _refusal(msg, refused=True, reason=reason, client=ident.client_id)
        result = train_local(model, plugin, rt.tokenizer, data, cfg, steps, rt.device, sigma, seed,
                             desc=f"client {ident.client_id} round {server_round}")
        state = {k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()}
        if ledger is not None:
            output_hash = _digest(state)
            if replay is not None and replay.output_hash != output_hash:
                try:  # not bit-identical (non-deterministic kernels): releasing it is new spending
                    ledger.check_budget(steps)
                except BudgetExceeded as exc:  # nothing released, nothing spent
                    log.warning("%s", exc)
                    return _refusal(msg, refused=True, reason=str(exc), client=ident.client_id)
            elif replay is not None:
                log.info("client %s: round %d re-run reproduced its released update bit for bit; no new "
                         "privacy cost", ident.client_id, server_round)
            epsilon = ledger.record(server_round, result.steps, replay_key, output_hash)
            _save_ledger(ledger, ident, context)
        local_after = plugin.local_state(model)
        if local_after:  # stays in this node's Context.state; never part of the reply
            context.state[LOCAL_STATE_KEY] = state_to_arrayrecord(local_after)

    metrics = MetricRecord({
        "num-examples": result.examples,
        "train-loss": result.loss_mean,
        "train-loss-first": result.loss_first,
        "train-loss-last": result.loss_last,
        "steps": result.steps,
        "samples-seen": result.samples_seen,
        "seconds": result.seconds,
        "epsilon": epsilon if cfg.privacy.enabled else float("inf"),
        "noise-multiplier": sigma or 0.0,
        "bytes-up": state_nbytes(state),
    })
    if fault == "timeout":  # emulated: the client trained and spent its budget; the reply is lost
        return _refusal(msg, **{"timed-out": True}, client=ident.client_id,
                        reason=f"injected timeout in round {server_round} attempt {attempt} "
                               f"(faults.fail_rate={cfg.faults.fail_rate:g}); reply discarded")
    info = ConfigRecord({"client": ident.client_id, "frozen-hash": local_hash,
                         "accountant": ledger.accountant if ledger else "none",
                         **({"profile": hetero["profile"]} if hetero else {})})
    content = RecordDict({"arrays": state_to_arrayrecord(state), "metrics": metrics, "info": info})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


__all__ += ["build_loader", "loader_sample_rate", "tensorize"]
