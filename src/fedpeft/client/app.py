"""The fedpeft ClientApp: one round of local (DP-)training per TRAIN message.

Per round the client
1. parses the configuration the server sent (cached by hash) and finds its own data
   (simulation: its partition of the pool; deployment: ``data-path`` in its node config);
2. checks the hash of its locally generated frozen tensors (FFA-LoRA's A) against the
   server's -- a mismatch is an error, never tolerated;
3. answers a round it has already released (same replay key: global state, local state,
   configuration, round) from its stored release (:mod:`fedpeft.client.node_store`): nothing is
   retrained, nothing is charged;
4. loads its privacy ledger (disk + ``Context.state``), checks the run's plan against it
   (:meth:`fedpeft.privacy.ledger.Ledger.ensure_plan`: calibrates sigma once, recalibrates or refuses
   when q, delta or the target changed), against its budget and against the node's own limits
   (:mod:`fedpeft.client.limits`); refuses with a reason and no weights when any says no;
5. trains with randomness from its **node secret** (:mod:`fedpeft.privacy.randomness`; nothing the
   server sends seeds it), records the sigma, q and steps that actually ran, stores the
   release, and replies.

What a DP reply carries (the server is the adversary DP protects against): the DP-trained
state and only values that are public by design or derived from public values --
``num-examples`` (public: the neighbouring relation is replace-one, see README), ``steps``,
``sample-rate``, ``noise-multiplier``, ``epsilon``, ``delta``, ``bytes-up``. Training loss,
Poisson batch sizes and wall time stay on the node (debug log). Without DP those diagnostics
are sent as before. A failure on the node is logged on the node; the reply says only what
kind of failure it was (:class:`NodeRefusal` texts are written to carry no data).
In simulation ``faults.fail_rate`` injects seeded crashes and timeouts (:mod:`fedpeft.sim.faults`).
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

from fedpeft.adapters.capabilities import RankTiers
from fedpeft.client.limits import node_budget_refusal, node_delta_refusal
from fedpeft.client.node_store import StoredRelease, load_release, node_secret, save_release
from fedpeft.client.runtime import ClientIdentity, NodeRefusal, runtime_for
from fedpeft.client.trainer import LocalResult, build_loader, local_steps, tensorize, train_local
from fedpeft.config import RunConfig
from fedpeft.privacy.accounting import DEFAULT_RELATION
from fedpeft.privacy.dpsgd import loader_sample_rate
from fedpeft.privacy.ledger import BudgetExceeded, Ledger
from fedpeft.privacy.plan import sample_rate_for
from fedpeft.privacy.randomness import RoundRandomness
from fedpeft.sim.faults import InjectedCrash, draw_fault
from fedpeft.strategies.adapter_avg import state_nbytes, state_to_arrayrecord

__all__ = ["app", "handle_train"]

log = logging.getLogger("fedpeft.client")
app = ClientApp()

LEDGER_STATE_KEY = "fedpeft-ledger"
LOCAL_STATE_KEY = "fedpeft-local"


def _ledger(cfg: RunConfig, ident: ClientIdentity, context: Context) -> Ledger:
    state = context.state.get(LEDGER_STATE_KEY)
    state_json = str(state["json"]) if isinstance(state, ConfigRecord) and "json" in state else None
    return Ledger.load_or_new(
        ident.ledger_dir / f"client-{ident.client_id}.json", state_json,
        client=ident.client_id, target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )


def _save_ledger(ledger: Ledger, ident: ClientIdentity, context: Context) -> None:
    ledger.save(ident.ledger_dir / f"client-{ident.client_id}.json")
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})


def _digest(*parts: str | Mapping[str, np.ndarray]) -> str:
    """SHA-256 over strings and named arrays (names, dtypes, shapes and bytes, in name order),
    every field length-prefixed so that no two different inputs frame to the same bytes."""
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big") + data)

    for part in parts:
        if isinstance(part, str):
            field(b"s" + part.encode())
            continue
        field(b"m" + str(len(part)).encode())
        for name in sorted(part):
            arr = np.ascontiguousarray(part[name])
            field(f"{name}|{arr.dtype}|{arr.shape}".encode())
            field(arr.tobytes())
    return h.hexdigest()


def _data_digest(data: Any) -> str:
    """SHA-256 of the node's examples (texts and labels): a changed file is a new computation."""
    h = hashlib.sha256()
    for text in data.texts:
        raw = str(text).encode()
        h.update(len(raw).to_bytes(8, "big") + raw)
    h.update(np.ascontiguousarray(np.asarray(data.labels)).tobytes())
    return h.hexdigest()


def _refusal(msg: Message, **status: Any) -> Message:
    return Message(content=RecordDict({"status": ConfigRecord(status)}), reply_to=msg)


def _hetero_directive(conf: ConfigRecord, partition_id: int | None) -> dict[str, Any]:
    """This client's entry of the heterogeneous-device plan (src/fedpeft/sim/hetero), if any:
    its emulated profile, the physical batch / rank its memory allows, and a reason to skip
    this round (offline, or its device cannot fit the model)."""
    raw = str(conf.get("hetero-plan", "") or "")
    if not raw or partition_id is None:
        return {}
    plan = json.loads(raw)
    profile = plan["profiles"][plan["assign"][partition_id]]
    return {"profile": profile, **plan["plan"][profile], "skip": plan["skip"].get(str(partition_id), "")}


def _metrics(cfg: RunConfig, result: LocalResult, epsilon: float, sigma: float | None, nbytes: int,
             client: str, server_round: int) -> dict[str, Any]:
    """The reply's metrics: under DP only public values; the rest stays in the node's log."""
    public: dict[str, Any] = {"num-examples": result.examples, "steps": result.steps, "bytes-up": nbytes}
    diagnostics = {"train-loss": result.loss_mean, "train-loss-first": result.loss_first,
                   "train-loss-last": result.loss_last, "samples-seen": result.samples_seen,
                   "seconds": result.seconds}
    if not cfg.privacy.enabled:
        return {**public, **diagnostics, "epsilon": float("inf"), "noise-multiplier": 0.0}
    log.debug("client %s round %d (stays on this node): %s", client, server_round, diagnostics)
    return {**public, "epsilon": epsilon, "delta": cfg.privacy.delta, "noise-multiplier": float(sigma or 0.0),
            "sample-rate": result.sample_rate}


def _identity(conf: ConfigRecord, context: Context) -> ClientIdentity:
    node = dict(context.node_config)
    if node.get("data-path") and not str(node.get("ledger-dir") or "").strip():
        raise NodeRefusal("this deployed node has no ledger-dir in its node config; a node keeps its own ledger "
                          "and secret on its own disk (set ledger-dir=...)")
    return ClientIdentity.from_node(node, dict(conf))


def handle_train(msg: Message, context: Context) -> Message:
    """Pure function of (message, context) so tests can call it without Flower's runtime."""
    conf: ConfigRecord = msg.content.config_records["config"]
    rt = runtime_for(str(conf["fedpeft-config"]), str(conf["config-hash"]))  # verifies the hash
    cfg = rt.cfg
    server_round = int(conf["server-round"])  # type: ignore[arg-type]
    ident = _identity(conf, context)
    if not 1 <= server_round <= cfg.train.rounds:  # the plan covers rounds 1..rounds, nothing else
        return _refusal(msg, refused=True, client=ident.client_id,
                        reason=f"client {ident.client_id}: round {server_round} is outside the run's rounds "
                               f"1..{cfg.train.rounds}: no privacy budget was planned for it "
                               f"(example-level, {DEFAULT_RELATION}, delta={cfg.privacy.delta:g})")
    try:
        data = rt.data_for(ident, dict(context.node_config))
    except Exception:  # the text may name labels, columns or values of the node's data
        log.exception("client %s: could not use its local data", ident.client_id)
        return _refusal(msg, refused=True, client=ident.client_id,
                        reason="local data could not be used; details are in the node's log")
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
        reply = _train_round(msg, context, rt, cfg, ident, data, hetero, server_round)
    if fault == "timeout" and "arrays" in reply.content:  # emulated: trained and spent; the reply is lost
        spent = reply.content["metrics"]["epsilon"]
        return _refusal(msg, **{"timed-out": True}, client=ident.client_id,
                        epsilon=float(spent) if isinstance(spent, (int, float)) else float("inf"),
                        reason=f"injected timeout in round {server_round} attempt {attempt} "
                               f"(faults.fail_rate={cfg.faults.fail_rate:g}); reply discarded")
    return reply


def _train_round(msg: Message, context: Context, rt: Any, cfg: RunConfig, ident: ClientIdentity, data: Any,
                 hetero: dict[str, Any], server_round: int) -> Message:
    """Steps 2-5 of the module doc, under the runtime's lock (one cached model per process)."""
    plugin, conf = rt.plugin, msg.content.config_records["config"]
    model = rt.model
    rt.activate(model, ident)
    local_hash = plugin.frozen_fingerprint(model)
    expected = str(conf.get("frozen-hash", ""))
    if expected != local_hash:
        raise NodeRefusal(
            f"client {ident.client_id}: frozen-tensor hash mismatch (local {local_hash[:12]} != server "
            f"{expected[:12]}); the adapter seed or code differs from the server's"
        )
    incoming = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    # Client-local tensors (e.g. ABMLL's posterior): restored per client, since one cached
    # model serves several virtual clients in simulation; empty = fresh client (reset).
    local = context.state.get(LOCAL_STATE_KEY)
    local_in = {k: v.numpy() for k, v in local.items()} if isinstance(local, ArrayRecord) else {}
    steps = local_steps(cfg, len(data))
    # Everything this round's update is a function of (besides the node's secret and the plan's
    # sigma and q, added below): the verified configuration, round, client, steps, the device
    # directive, the global and local state, and the node's data. Same key, same release; the
    # key also keys the round's randomness, so two different computations never share noise
    # or batches (the server could otherwise subtract one release from the other).
    replay_key = _digest(str(conf["config-hash"]), f"{server_round}|{ident.client_id}|{steps}",
                         json.dumps(hetero, sort_keys=True, default=str), incoming, local_in, _data_digest(data))
    info = {"client": ident.client_id, "frozen-hash": local_hash, **({"profile": hetero["profile"]} if hetero else {})}
    ledger = None
    if cfg.privacy.enabled:
        ledger = _ledger(cfg, ident, context)
        stored = load_release(ident.ledger_dir, ident.client_id, server_round, replay_key)
        if stored is not None and ledger.replay_of(server_round, replay_key) is not None:
            log.info("client %s: round %d was already released from these inputs; re-sending the stored "
                     "release (no new privacy cost)", ident.client_id, server_round)
            if stored.local:
                context.state[LOCAL_STATE_KEY] = state_to_arrayrecord(stored.local)
            return _reply(msg, stored.state, stored.metrics, {**info, "accountant": ledger.accountant})
        # The plan is made and checked on a copy: a refused request leaves the ledger as it was
        # (a server cannot store a plan, a delta or a target in it by asking).
        trial = Ledger.from_json(ledger.to_json())
        try:
            if reason := node_delta_refusal(context.node_config, cfg):
                raise BudgetExceeded(reason)  # before calibrating: a tiny-delta plan is costly and moot
            note = trial.ensure_plan(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
                                     sample_rate=sample_rate_for(len(data), cfg.train.batch_size),
                                     planned_steps=steps * (cfg.train.rounds - server_round + 1),
                                     accountant=cfg.privacy.accountant)
            log.debug("%s", note)
            trial.check_budget(steps)
            capped = node_budget_refusal(context.node_config, cfg, trial, steps, server_round)
            if capped:
                raise BudgetExceeded(capped)
        except BudgetExceeded as exc:
            log.warning("%s", exc)
            return _refusal(msg, refused=True, reason=str(exc), client=ident.client_id,
                            epsilon=ledger.epsilon()[0])
        ledger = trial
        secret = node_secret(ident.ledger_dir, ident.client_id, deployed=bool(ident.data_path))
        rng: RoundRandomness | int = RoundRandomness.fresh_keys() if cfg.privacy.secure_mode \
            else RoundRandomness.derived(secret, replay_key, repr(ledger.noise_multiplier), repr(ledger.sample_rate))
    elif reason := node_budget_refusal(context.node_config, cfg, None, steps, server_round):
        log.warning("client %s: %s", ident.client_id, reason)
        return _refusal(msg, refused=True, reason=reason, client=ident.client_id)
    else:
        rng = int(hashlib.sha256(replay_key.encode()).hexdigest()[:15], 16)  # no DP: nothing to protect
    plugin.load_state(model, incoming)
    if hetero and isinstance(plugin, RankTiers):
        plugin.set_client_rank(model, int(hetero["rank"]))
    plugin.load_local_state(model, local_in)
    sigma = ledger.noise_multiplier if ledger is not None else None
    result = train_local(model, plugin, rt.tokenizer, data, cfg, steps, rt.device, sigma, rng,
                         desc=f"client {ident.client_id} round {server_round}")
    state = {k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()}
    local_after = plugin.local_state(model)
    epsilon, output_hash = float("inf"), _digest(state)
    if ledger is not None:
        # Record first, then store: a crash in between can only over-count, never under-count.
        epsilon = ledger.record(server_round, result.steps, replay_key, output_hash,
                                noise_multiplier=float(sigma or 0.0), sample_rate=result.sample_rate)
        _save_ledger(ledger, ident, context)
    metrics = _metrics(cfg, result, epsilon, sigma, state_nbytes(state), ident.client_id, server_round)
    if ledger is not None:
        save_release(ident.ledger_dir, ident.client_id,
                     StoredRelease(server_round, replay_key, output_hash, state, local_after, metrics))
    if local_after:  # stays in this node's Context.state; never part of the reply
        context.state[LOCAL_STATE_KEY] = state_to_arrayrecord(local_after)
    return _reply(msg, state, metrics, {**info, "accountant": ledger.accountant if ledger else "none"})


def _reply(msg: Message, state: Mapping[str, np.ndarray], metrics: Mapping[str, Any], info: Mapping[str, Any]) -> Message:
    content = RecordDict({"arrays": state_to_arrayrecord(dict(state)), "metrics": MetricRecord(dict(metrics)),
                          "info": ConfigRecord(dict(info))})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's entry point: :func:`handle_train`, with every failure's text kept on the node.

    Flower puts an exception's text into the error reply the server reads; a data error's
    text can name the node's labels, columns or values. Only :class:`NodeRefusal` and the
    simulation's injected crashes (texts written to carry no data) pass through as they are.
    """
    try:
        return handle_train(msg, context)
    except (NodeRefusal, InjectedCrash):
        raise
    except Exception:
        log.exception("training failed on this node")
        raise NodeRefusal("training failed on the node; details are in the node's log") from None


__all__ += ["NodeRefusal", "build_loader", "loader_sample_rate", "node_budget_refusal", "tensorize"]
