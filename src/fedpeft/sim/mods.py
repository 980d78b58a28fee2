"""Simulation-only client behaviour, as Flower ClientApp mods the simulator installs.

The real client (:mod:`fedpeft.client.app`) knows nothing of the simulator; a deployed node
runs it without these mods (pyproject's ``clientapp``). :func:`simulation_app` is the ClientApp
that :func:`fedpeft.sim.simulate.simulate` runs: the real one wrapped, outermost first, in

* :func:`hetero_mod` -- device emulation (``src/fedpeft/sim/hetero``): reads this client's entry
  of the round's ``hetero-plan`` (:func:`fedpeft.wire.decode_hetero_plan`); a client whose
  emulated device is offline or cannot fit the model sits the round out (a ``hetero-skip``
  refusal, nothing trained or spent); any other hands its
  :class:`~fedpeft.wire.DeviceDirective` (profile, physical batch, rank tier) to the client in
  ``Context.state`` for this one call;
* :func:`fault_mod` -- fault injection (``faults.fail_rate``, :func:`fedpeft.sim.faults.draw_fault`):
  a *crash* raises :class:`~fedpeft.sim.faults.InjectedCrash` before training (Flower turns it
  into an error reply; nothing was spent); a *timeout* lets the client train and spend, then
  replaces its release with a ``timed-out`` status (the reply is lost).

Both act only on simulated clients (a ``partition-id``, no ``data-path`` in the node config).
Neither seeds anything of the client: its DP randomness comes from its node secret alone; the
fault draw is the simulator's own, from the run seed.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

import fedpeft.wire as wire
from fedpeft.client.app import client_app
from fedpeft.client.runtime import ClientIdentity, runtime_for
from fedpeft.sim.faults import InjectedCrash, draw_fault

__all__ = ["SIMULATION_MODS", "fault_mod", "hetero_mod", "simulation_app"]


def hetero_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Device emulation (module doc): skip the round, or train with this client's directive."""
    conf = wire.round_config_of(msg)
    raw = str(conf.get(wire.HETERO_PLAN, "") or "")
    ident = ClientIdentity.from_node(dict(context.node_config), dict(conf))
    if not raw or ident.partition_id is None:
        return call_next(msg, context)
    directive, skip = wire.decode_hetero_plan(raw, ident.partition_id)
    if skip:
        return wire.refusal(msg, ident.client_id, skip, hetero_skip=True)
    directive.store(context.state)
    try:
        return call_next(msg, context)
    finally:
        wire.DeviceDirective.clear(context.state)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fault injection (module doc), drawn from (seed, round, attempt, client)."""
    conf = wire.round_config_of(msg)
    rc = wire.RoundConfig.from_record(conf)
    ident = ClientIdentity.from_node(dict(context.node_config), dict(conf))
    if ident.partition_id is None:
        return call_next(msg, context)
    cfg = runtime_for(rc.config_toml, rc.config_hash).cfg  # verifies the hash; cached for the client
    rate, server_round, attempt = cfg.faults.fail_rate, rc.server_round, rc.attempt
    fault = draw_fault(rate, cfg.seed, server_round, attempt, ident.client_id)
    if fault == "crash":
        raise InjectedCrash(f"client {ident.client_id}: injected crash in round {server_round} attempt {attempt} "
                            f"(faults.fail_rate={rate:g})")
    reply = call_next(msg, context)
    if fault == "timeout" and wire.ARRAYS in reply.content:  # emulated: trained and spent; the reply is lost
        spent = reply.content[wire.METRICS][wire.EPSILON]
        return wire.timed_out(msg, ident.client_id, reason=f"injected timeout in round {server_round} attempt "
                              f"{attempt} (faults.fail_rate={rate:g}); reply discarded",
                              epsilon=float(spent) if isinstance(spent, (int, float)) else float("inf"))
    return reply


SIMULATION_MODS: tuple[Mod, ...] = (hetero_mod, fault_mod)  # outermost first: a skipped device draws no fault


def simulation_app() -> ClientApp:
    """The ClientApp the simulator runs: the real client with :data:`SIMULATION_MODS`."""
    return client_app(SIMULATION_MODS)
