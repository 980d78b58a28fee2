"""The fedpeft ClientApp: one round of local (DP-)training per TRAIN message.

:func:`handle_train` is a few named steps, in order:

1. **parse and verify** (:func:`_parse`): parse the round's configuration (the protocol is
   :mod:`fedpeft.wire`; the run configuration is cached by hash, which it must match), find
   who this node is and its data (simulation: its partition of the pool; deployment:
   ``data-path`` in its node config); refuse a round outside the run's plan, unusable data
   or a simulation directive it cannot follow (below);
2. **inputs** (:func:`_inputs`): check the hash of its locally generated frozen tensors
   (FFA-LoRA's A) against the server's -- a mismatch is an error, never tolerated -- and fix
   the replay key: everything this round's update is a function of;
3. **replay**: answer a round it has already released from these inputs from its stored
   release (:mod:`fedpeft.client.node_store`): nothing is retrained, nothing is charged;
4. **plan the budget** (:func:`_plan_budget`) on a trial copy of its privacy ledger (disk +
   ``Context.state``): the run's plan (:meth:`fedpeft.privacy.ledger.Ledger.ensure_plan`:
   calibrates sigma once, recalibrates or refuses when q, delta or the target changed), its
   budget and the node's own limits (:mod:`fedpeft.client.limits`); a refusal carries a
   reason and no weights, and leaves the ledger as it was;
5. **train** (:func:`_train`) with randomness from its **node secret**
   (:mod:`fedpeft.privacy.randomness`; nothing the server sends seeds it);
6. **store the release** (:func:`_store_release`): record the sigma, q and steps that
   actually ran, then store the release; and **reply**.

What a DP reply carries (the server is the adversary DP protects against): the DP-trained
state and only values that are public by design or derived from public values
(:data:`fedpeft.wire.DP_METRICS`: ``num-examples`` is public as the neighbouring relation is
replace-one, see README). A personalised evaluation's accuracy (last round,
:mod:`fedpeft.client.personal_eval`) is the one data-dependent value, sent only as a release
that the ledger planned and recorded. Training loss, Poisson batch sizes and wall time stay on the node
(debug log). Without DP those diagnostics are sent as before. A failure on the node is
logged on the node; the reply says only what kind of failure it was (:class:`NodeRefusal`
texts are written to carry no data).

**Simulation-only behaviour lives outside this module.** Fault injection
(``faults.fail_rate``) and device emulation (the round's ``hetero-plan``) are Flower ClientApp
mods in :mod:`fedpeft.sim.mods` that only the simulator installs (:func:`client_app`); the
deployed app :data:`app` has none. So a deployed node ignores ``faults.fail_rate`` (it has real
faults instead) and **refuses** a round that carries ``hetero-plan``: following it would
mean training as a device it is not, on a rank or batch the server chose; refusing makes
the mismatch visible to the server before anything is spent. A simulated client follows
its device directive (:class:`fedpeft.wire.DeviceDirective`) only as handed over by the
simulator's mod in ``Context.state``, which no server can write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

import fedpeft.wire as wire
from fedpeft.adapters.capabilities import PersonalEvalParams, RankTiers
from fedpeft.client.limits import node_budget_refusal, node_delta_refusal
from fedpeft.client.node_store import (
    StoredRelease,
    data_digest,
    digest,
    load_ledger,
    load_local,
    load_release,
    node_secret,
    save_ledger,
    save_local,
    save_release,
)
from fedpeft.client.personal_eval import (
    check_accounted,
    eval_params,
    personal_accuracy,
    record_eval,
    reserved,
    split_held_out,
)
from fedpeft.client.runtime import ClientIdentity, NodeRefusal, Runtime, runtime_for
from fedpeft.client.trainer import LocalResult, build_loader, local_steps, tensorize, train_local
from fedpeft.config import RunConfig
from fedpeft.data.sources import TextDataset
from fedpeft.privacy.accounting import DEFAULT_RELATION
from fedpeft.privacy.dpsgd import loader_sample_rate
from fedpeft.privacy.ledger import BudgetExceeded, Ledger
from fedpeft.privacy.plan import sample_rate_for
from fedpeft.privacy.randomness import RoundRandomness

__all__ = ["app", "client_app", "handle_train", "train"]

log = logging.getLogger("fedpeft.client")

LOCAL_STATE_KEY = "fedpeft-local"
LOCAL_ROUND_KEY = "fedpeft-local-round"  # the round after which Context.state's local state was kept


@dataclass(frozen=True)
class RoundRequest:
    """A verified TRAIN message: what this node is asked to compute (step 1)."""

    msg: Message
    context: Context
    rt: Runtime
    cfg: RunConfig  # the run's, with a simulated device's physical batch applied
    ident: ClientIdentity
    round: wire.RoundConfig
    data: TextDataset  # what trains (less the held-out split of a personalised evaluation)
    device: wire.DeviceDirective | None  # simulation only (module doc)
    personal: PersonalEvalParams | None = None  # fedpeft.client.personal_eval
    held: TextDataset | None = None  # its held-out split

    @property
    def evaluates(self) -> bool:
        """This round releases the personalised evaluation (the last round, before training)."""
        return self.personal is not None and self.round.server_round == self.cfg.train.rounds


@dataclass(frozen=True)
class RoundInputs:
    """What this round's update is a function of, besides the node's secret and the plan (step 2)."""

    incoming: dict[str, np.ndarray]  # the global state
    local_in: dict[str, np.ndarray]  # this client's local (never sent) state
    steps: int
    replay_key: str
    info: dict[str, Any]  # the reply's INFO record, less the accountant


def _identity(conf: ConfigRecord, context: Context) -> ClientIdentity:
    node = dict(context.node_config)
    if node.get(wire.DATA_PATH) and not str(node.get(wire.LEDGER_DIR) or "").strip():
        raise NodeRefusal("this deployed node has no ledger-dir in its node config; a node keeps its own ledger "
                          "and secret on its own disk (set ledger-dir=...)")
    return ClientIdentity.from_node(node, dict(conf))


def _directive_refusal(msg: Message, conf: ConfigRecord, ident: ClientIdentity, context: Context) -> Message | None:
    """The refusal of a round carrying a simulation entry that this node does not follow:
    only a simulated client whose device directive the simulator's mod handed over trains it."""
    sent = [key for key in wire.SIMULATION_ENTRIES if conf.get(key)]
    if not sent or (ident.partition_id is not None and wire.DeviceDirective.read(context.state) is not None):
        return None
    reason = (f"client {ident.client_id}: the round carries the simulation directive {sent[0]!r}; this node does "
              f"not emulate devices (only `fedpeft simulate`'s ClientApp follows it): refusing to train")
    log.warning("%s", reason)
    return wire.refusal(msg, ident.client_id, reason)


def _parse(msg: Message, context: Context) -> RoundRequest | Message:
    """Step 1 (module doc): the verified request, or a refusal reply."""
    conf = wire.round_config_of(msg)
    rc = wire.RoundConfig.from_record(conf)
    rt = runtime_for(rc.config_toml, rc.config_hash)  # verifies the hash
    cfg, server_round = rt.cfg, rc.server_round
    ident = _identity(conf, context)
    if (refusal := _directive_refusal(msg, conf, ident, context)) is not None:
        return refusal
    if not 1 <= server_round <= cfg.train.rounds:  # the plan covers rounds 1..rounds, nothing else
        return wire.refusal(msg, ident.client_id,
                            f"client {ident.client_id}: round {server_round} is outside the run's rounds "
                            f"1..{cfg.train.rounds}: no privacy budget was planned for it "
                            f"(example-level, {DEFAULT_RELATION}, delta={cfg.privacy.delta:g})")
    try:
        data = rt.data_for(ident, dict(context.node_config))
    except Exception:  # the text may name labels, columns or values of the node's data
        log.exception("client %s: could not use its local data", ident.client_id)
        return wire.refusal(msg, ident.client_id, "local data could not be used; details are in the node's log")
    device = wire.DeviceDirective.read(context.state) if ident.partition_id is not None else None
    if device is not None:  # smaller physical batch = Opacus virtual steps; the logical batch (and DP) is unchanged
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, physical_batch_size=device.physical_batch))
    personal, held = eval_params(rt.plugin, cfg), None
    if personal is not None:
        data, held = split_held_out(data, personal.fraction, cfg.seed, ident.client_id)
    return RoundRequest(msg, context, rt, cfg, ident, rc, data, device, personal, held)


def handle_train(msg: Message, context: Context) -> Message:
    """Pure function of (message, context) so tests can call it without Flower's runtime."""
    request = _parse(msg, context)
    if isinstance(request, Message):
        return request
    with request.rt.lock:
        return _train_round(request)


def _train_round(req: RoundRequest) -> Message:
    """Steps 2-6 of the module doc, under the runtime's lock (one cached model per process)."""
    inputs = _inputs(req)
    ledger: Ledger | None = None
    rng: RoundRandomness | int
    if req.cfg.privacy.enabled:
        ledger = load_ledger(req.cfg, req.ident.ledger_dir, req.ident.client_id, req.context)
        if (replayed := _replayed(req, inputs, ledger)) is not None:
            return replayed
        planned = _plan_budget(req, inputs, ledger)
        if isinstance(planned, Message):
            return planned
        ledger = planned
        secret = node_secret(req.ident.ledger_dir, req.ident.client_id, deployed=bool(req.ident.data_path))
        rng = RoundRandomness.fresh_keys() if req.cfg.privacy.secure_mode else RoundRandomness.derived(
            secret, inputs.replay_key, repr(ledger.noise_multiplier), repr(ledger.sample_rate))
    elif reason := node_budget_refusal(req.context.node_config, req.cfg, None, inputs.steps, req.round.server_round):
        log.warning("client %s: %s", req.ident.client_id, reason)
        return wire.refusal(req.msg, req.ident.client_id, reason)
    else:
        rng = int(hashlib.sha256(inputs.replay_key.encode()).hexdigest()[:15], 16)  # no DP: nothing to protect
    state, local_after, result, personal = _train(req, inputs, ledger, rng)
    metrics = _store_release(req, inputs, ledger, state, local_after, result, personal)
    return _reply(req, state, metrics, {**inputs.info, wire.ACCOUNTANT: ledger.accountant if ledger else "none"},
                  ledger)


def _inputs(req: RoundRequest) -> RoundInputs:
    """Step 2: the frozen-tensor check and the replay key (module doc)."""
    plugin, model, ident = req.rt.plugin, req.rt.model, req.ident
    req.rt.activate(model, ident)
    local_hash = plugin.frozen_fingerprint(model)
    expected = req.round.frozen_hash
    if expected != local_hash:
        raise NodeRefusal(
            f"client {ident.client_id}: frozen-tensor hash mismatch (local {local_hash[:12]} != server "
            f"{expected[:12]}); the adapter seed or code differs from the server's"
        )
    incoming = wire.arrayrecord_to_state(req.msg.content.array_records[wire.ARRAYS])
    local_in = _local_before(req)
    steps = local_steps(req.cfg, len(req.data))
    # Everything this round's update is a function of (besides the node's secret and the plan's
    # sigma and q, added by the randomness): the verified configuration, round, client, steps, the
    # device directive, the global and local state, and the node's data. Same key, same release;
    # the key also keys the round's randomness, so two different computations never share noise
    # or batches (the server could otherwise subtract one release from the other).
    replay_key = digest(req.round.config_hash, f"{req.round.server_round}|{ident.client_id}|{steps}",
                         req.device.replay_part() if req.device else "{}", incoming, local_in, data_digest(req.data),
                         *(() if req.held is None else (data_digest(req.held),)))
    info: dict[str, Any] = {wire.CLIENT: ident.client_id, wire.FROZEN_HASH: local_hash}
    if req.device is not None:
        info[wire.PROFILE] = req.device.profile
    return RoundInputs(incoming, local_in, steps, replay_key, info)


def _local_before(req: RoundRequest) -> dict[str, np.ndarray]:
    """This client's local (never sent) tensors -- ABMLL's posterior, FedSA-LoRA's B -- as they
    were after its latest round before this one: from ``Context.state`` (one cached model serves
    several virtual clients in simulation), else from its own disk (a fresh process: a resumed
    run, a restarted node); empty for its first round (the plugin resets them). A retried
    round so starts from the same local state as its first try (and is replayed, not re-charged)."""
    server_round, state = req.round.server_round, req.context.state
    local, kept = state.get(LOCAL_STATE_KEY), state.get(LOCAL_ROUND_KEY)
    kept_round = kept.get("round") if isinstance(kept, ConfigRecord) else None
    if isinstance(local, ArrayRecord) and isinstance(kept_round, int) and kept_round < server_round:
        return wire.arrayrecord_to_state(local)
    return load_local(req.ident.ledger_dir, req.ident.client_id, req.round.config_hash, server_round)[1]


def _keep_local(req: RoundRequest, local: Mapping[str, np.ndarray]) -> None:
    """Keep the local state after this round in ``Context.state`` and on the node's disk."""
    req.context.state[LOCAL_STATE_KEY] = wire.state_to_arrayrecord(dict(local))
    req.context.state[LOCAL_ROUND_KEY] = ConfigRecord({"round": req.round.server_round})
    save_local(req.ident.ledger_dir, req.ident.client_id, req.round.config_hash, req.round.server_round, local)


def _replayed(req: RoundRequest, inputs: RoundInputs, ledger: Ledger) -> Message | None:
    """Step 3: the stored release of this round from these inputs, re-sent (no new privacy cost)."""
    ident, server_round = req.ident, req.round.server_round
    stored = load_release(ident.ledger_dir, ident.client_id, server_round, inputs.replay_key)
    if stored is None or ledger.replay_of(server_round, inputs.replay_key) is None:
        return None
    log.info("client %s: round %d was already released from these inputs; re-sending the stored "
             "release (no new privacy cost)", ident.client_id, server_round)
    if stored.local:
        _keep_local(req, stored.local)
    return _reply(req, stored.state, stored.metrics, {**inputs.info, wire.ACCOUNTANT: ledger.accountant}, ledger)


def _plan_budget(req: RoundRequest, inputs: RoundInputs, ledger: Ledger) -> Ledger | Message:
    """Step 4: the ledger with this run's plan checked on a trial copy, or the refusal reply.

    A refused request leaves the ledger as it was: a server cannot store a plan, a delta or
    a target in it by asking.
    """
    cfg, node_config, server_round = req.cfg, req.context.node_config, req.round.server_round
    trial = Ledger.from_json(ledger.to_json())
    try:
        if reason := node_delta_refusal(node_config, cfg):
            raise BudgetExceeded(reason)  # before calibrating: a tiny-delta plan is costly and moot
        note = trial.ensure_plan(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
                                 sample_rate=sample_rate_for(len(req.data), cfg.train.batch_size),
                                 planned_steps=inputs.steps * (cfg.train.rounds - server_round + 1),
                                 accountant=cfg.privacy.accountant, reserved=reserved(cfg, req.personal))
        log.debug("%s", note)
        trial.check_budget(inputs.steps)
        capped = node_budget_refusal(node_config, cfg, trial, inputs.steps, server_round)
        if capped:
            raise BudgetExceeded(capped)
    except BudgetExceeded as exc:
        log.warning("%s", exc)
        return wire.refusal(req.msg, req.ident.client_id, str(exc), epsilon=ledger.epsilon()[0])
    return trial


def _train(req: RoundRequest, inputs: RoundInputs, ledger: Ledger | None, rng: RoundRandomness | int
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LocalResult, float | None]:
    """Step 5: load the global and local state, (last round of a personalised evaluation: evaluate
    that model on the held-out split), train, and read back (state, local state, result, accuracy)."""
    plugin, model, device = req.rt.plugin, req.rt.model, req.device
    plugin.load_state(model, inputs.incoming)
    if device is not None and isinstance(plugin, RankTiers):
        plugin.set_client_rank(model, device.rank)
    plugin.load_local_state(model, inputs.local_in)
    sigma = ledger.noise_multiplier if ledger is not None else None
    personal = None
    if req.evaluates and req.personal is not None and req.held is not None:
        personal = personal_accuracy(req.rt.task_type, model, req.rt.tokenizer, req.held, req.cfg, req.rt.device,
                                     req.personal.sigma if ledger is not None else None)
    result = train_local(model, plugin, req.rt.tokenizer, req.data, req.cfg, inputs.steps, req.rt.device, sigma, rng,
                         desc=f"client {req.ident.client_id} round {req.round.server_round}",
                         encoded=req.rt.encoded(req.ident, req.data))
    state = {k: v.detach().cpu().numpy().copy() for k, v in plugin.trainable_state(model).items()}
    return state, plugin.local_state(model), result, personal


def _store_release(req: RoundRequest, inputs: RoundInputs, ledger: Ledger | None, state: dict[str, np.ndarray],
                   local_after: dict[str, np.ndarray], result: LocalResult, personal: float | None) -> dict[str, Any]:
    """Step 6: record the spending (and a personalised evaluation's release), store the release and
    the local state; return the reply's metrics.

    Record first, then store: a crash in between can only over-count, never under-count.
    """
    ident, context, server_round = req.ident, req.context, req.round.server_round
    epsilon, output_hash = float("inf"), digest(state)
    sigma = ledger.noise_multiplier if ledger is not None else None
    if ledger is not None:
        epsilon = ledger.record(server_round, result.steps, inputs.replay_key, output_hash,
                                noise_multiplier=float(sigma or 0.0), sample_rate=result.sample_rate)
        if personal is not None and req.personal is not None:
            epsilon = record_eval(ledger, server_round, inputs.replay_key, personal, req.personal.sigma)
        save_ledger(ledger, ident.ledger_dir, ident.client_id, context)
    metrics = _metrics(req.cfg, result, epsilon, sigma, wire.state_nbytes(state), ident.client_id, server_round)
    if personal is not None and req.held is not None:
        metrics.update({wire.PERSONAL_ACCURACY: personal, wire.PERSONAL_EXAMPLES: len(req.held)})
    if ledger is not None:
        save_release(ident.ledger_dir, ident.client_id,
                     StoredRelease(server_round, inputs.replay_key, output_hash, state, local_after, metrics))
    if local_after:  # stays on this node (Context.state and its disk); never part of the reply
        _keep_local(req, local_after)
    return metrics


def _metrics(cfg: RunConfig, result: LocalResult, epsilon: float, sigma: float | None, nbytes: int,
             client: str, server_round: int) -> dict[str, Any]:
    """The reply's metrics: under DP only public values; the rest stays in the node's log."""
    diag = wire.diagnostics(result.loss_mean, result.loss_first, result.loss_last, result.samples_seen,
                            result.seconds)
    if cfg.privacy.enabled:
        log.debug("client %s round %d (stays on this node): %s", client, server_round, diag)
    return wire.reply_metrics(cfg.privacy.enabled, result.examples, result.steps, nbytes, epsilon, cfg.privacy.delta,
                              sigma, result.sample_rate, diag)


def _reply(req: RoundRequest, state: Mapping[str, np.ndarray], metrics: Mapping[str, Any],
           info: Mapping[str, Any], ledger: Ledger | None = None) -> Message:
    """The release reply; under DP its metrics are checked against what DP replies may carry
    (a personalised accuracy only as a release recorded in ``ledger``)."""
    if req.cfg.privacy.enabled:
        check_accounted(metrics, ledger, req.round.server_round)
    return wire.train_reply(req.msg, state, metrics, info)


def train(msg: Message, context: Context) -> Message:
    """Flower's entry point: :func:`handle_train`, with every failure's text kept on the node.

    Flower puts an exception's text into the error reply the server reads; a data error's
    text can name the node's labels, columns or values. Only :class:`NodeRefusal` and
    :class:`fedpeft.wire.ProtocolError` (texts written to carry no data) pass through as they are.
    """
    try:
        return handle_train(msg, context)
    except (NodeRefusal, wire.ProtocolError):
        raise
    except Exception:
        log.exception("training failed on this node")
        raise NodeRefusal("training failed on the node; details are in the node's log") from None


def client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp whose TRAIN handler is :func:`train`, wrapped in Flower ClientApp ``mods``
    (outermost first). The deployed app :data:`app` has none; the simulator installs its own
    (:mod:`fedpeft.sim.mods`)."""
    new = ClientApp(mods=list(mods))
    new.train()(train)
    return new


app = client_app()  # trains in this process; pyproject's `clientapp` is fedpeft.client.node_app (a node's warm worker)

__all__ += ["NodeRefusal", "build_loader", "loader_sample_rate", "node_budget_refusal", "tensorize"]
