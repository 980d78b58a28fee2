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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.runtime import ClientIdentity, Runtime, runtime_for
from fl_client.trainer import build_loader, loader_sample_rate, local_steps, tensorize, train_local
from privacy.accounting import calibrate_noise
from privacy.ledger import BudgetExceeded, Ledger
from strategies.adapter_avg import state_nbytes, state_to_arrayrecord

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
        dataset_len = n_examples
        q = 1.0 / math.ceil(dataset_len / min(cfg.train.batch_size, dataset_len))
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
        status = ConfigRecord({"refused": True, "hetero-skip": True, "reason": hetero["skip"], "client": ident.client_id})
        return Message(content=RecordDict({"status": status}), reply_to=msg)
    if hetero:  # smaller physical batch = Opacus virtual steps; the logical batch (and DP) is unchanged
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, physical_batch_size=int(hetero["physical_batch"])))

    with rt.lock:
        model = rt.model
        local_hash = plugin.frozen_fingerprint(model)
        expected = str(conf.get("frozen-hash", ""))
        if expected != local_hash:
            raise RuntimeError(
                f"client {ident.client_id}: frozen-tensor hash mismatch (local {local_hash[:12]} != server "
                f"{expected[:12]}); the adapter seed or code differs from the server's"
            )
        plugin.load_state(model, {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()})
        if hetero and hasattr(plugin, "set_client_rank"):
            plugin.set_client_rank(model, int(hetero["rank"]))
        # Client-local tensors (e.g. ABMLL's posterior): restored per client, since one cached
        # model serves several virtual clients in simulation; empty = fresh client (reset).
        local = context.state.get(LOCAL_STATE_KEY)
        plugin.load_local_state(model, {k: v.numpy() for k, v in local.items()} if isinstance(local, ArrayRecord) else {})
        steps = local_steps(cfg, len(data))
        sigma: float | None = None
        epsilon = 0.0
        ledger = None
        if cfg.privacy.enabled:
            ledger = _ledger(rt, ident, context, len(data), steps)
            try:
                ledger.check_budget(steps)
            except BudgetExceeded as exc:
                _save_ledger(ledger, ident, context)
                log.warning("%s", exc)
                status = ConfigRecord({"refused": True, "reason": str(exc), "client": ident.client_id})
                return Message(content=RecordDict({"status": status}), reply_to=msg)
            sigma = ledger.noise_multiplier
        seed = cfg.seed * 1_000_003 + server_round * 7919 + (ident.partition_id or 0)
        result = train_local(model, plugin, rt.tokenizer, data, cfg, steps, rt.device, sigma, seed,
                             desc=f"client {ident.client_id} round {server_round}")
        if ledger is not None:
            epsilon = ledger.record(server_round, result.steps)
            _save_ledger(ledger, ident, context)
        state = {k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()}
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
    info = ConfigRecord({"client": ident.client_id, "frozen-hash": local_hash,
                         "accountant": ledger.accountant if ledger else "none",
                         **({"profile": hetero["profile"]} if hetero else {})})
    content = RecordDict({"arrays": state_to_arrayrecord(state), "metrics": metrics, "info": info})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


__all__ += ["build_loader", "loader_sample_rate", "tensorize"]
