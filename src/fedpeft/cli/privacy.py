"""``fedpeft privacy plan ...`` and ``fedpeft privacy audit RUN_DIR``.

``plan`` prints the noise multiplier a budget needs and the epsilon after every round,
before anything is trained (:mod:`fedpeft.privacy.plan`). ``audit`` recomputes every client's
epsilon from its ledger with Opacus (PRV, RDP) and Google's dp-accounting (PLD, RDP),
prints them side by side, and exits 1 when a reported epsilon is off by more than the
tolerance (:mod:`fedpeft.privacy.audit`). ``audit --empirical`` instead trains a canary-audited copy
of the run's mechanism and reports an empirical lower bound on epsilon beside the accounted
one, exiting 1 when the bound exceeds it (:mod:`fedpeft.sim.audit`).
"""

from __future__ import annotations

import argparse
import json
import math

from fedpeft.cli.common import register_command
from fedpeft.config import ConfigError


def _add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="privacy_command", metavar="ACTION", parser_class=type(p))
    plan = sub.add_parser("plan", help="noise multiplier and per-round epsilon for a planned run")
    plan.add_argument("--epsilon", type=float, required=True, help="target epsilon (example-level, per client)")
    plan.add_argument("--delta", type=float, default=1e-5, help="delta (default: 1e-5)")
    plan.add_argument("--rounds", type=int, required=True, help="federated rounds")
    plan.add_argument("--sample-rate", type=float, default=None,
                      help="Poisson sample rate q per step (or give --examples and --batch-size)")
    plan.add_argument("--examples", type=int, default=None, help="examples of one client (derives q)")
    plan.add_argument("--batch-size", type=int, default=None, help="expected logical batch size (derives q)")
    plan.add_argument("--steps-per-round", type=int, required=True, help="DP-SGD steps per client and round")
    plan.add_argument("--accountant", choices=("pld",), default="pld",
                      help="default: pld (dp-accounting PLD, replace-one neighbours: client example counts are public)")
    audit = sub.add_parser("audit", help="recompute every client's epsilon of a run independently")
    audit.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (with ledger/ and metrics.jsonl)")
    audit.add_argument("--tolerance", type=float, default=0.02, help="allowed relative difference (default: 0.02)")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument("--empirical", action="store_true",
                       help="one-run canary audit (src/fedpeft/sim/audit): an empirical lower bound on epsilon; "
                            "RUN_DIR may then also be a CONFIG file")
    audit.add_argument("--canaries", type=int, default=1000, help="--empirical: canaries m (default: 1000)")
    audit.add_argument("--beta", type=float, default=0.05, help="--empirical: 1 - confidence (default: 0.05)")
    audit.add_argument("--steps", type=int, default=None, help="--empirical: audit this many steps (default: the run's)")
    audit.add_argument("--score", choices=("llr", "sum"), default="llr", help="--empirical: canary score")
    audit.add_argument("--seed", type=int, default=None, help="--empirical: canary directions/membership seed")


def _plan(args: argparse.Namespace) -> int:
    from fedpeft.privacy.plan import make_plan, sample_rate_for

    if not math.isfinite(args.epsilon) or args.epsilon <= 0:
        raise ConfigError("--epsilon", args.epsilon, "must be a positive finite number")
    if not 0 < args.delta < 1:
        raise ConfigError("--delta", args.delta, "must be in (0, 1)")
    if args.rounds < 1:
        raise ConfigError("--rounds", args.rounds, "must be >= 1")
    if args.steps_per_round < 1:
        raise ConfigError("--steps-per-round", args.steps_per_round, "must be >= 1")
    q = args.sample_rate
    if q is None:
        if not args.examples or not args.batch_size or args.examples < 1 or args.batch_size < 1:
            raise ConfigError("--sample-rate", None, "give --sample-rate, or --examples and --batch-size (both >= 1)")
        q = sample_rate_for(args.examples, args.batch_size)
    if not 0 < q <= 1:
        raise ConfigError("--sample-rate", q, "must be in (0, 1]")
    try:
        plan = make_plan(args.epsilon, args.delta, args.rounds, q, args.steps_per_round, args.accountant)
    except RuntimeError as exc:
        raise ConfigError("--epsilon", args.epsilon, f"cannot be reached: {exc}") from None
    print("\n".join(plan.lines()))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedpeft.privacy.audit import audit_run

    if args.empirical:
        return _empirical(args)
    if not Path(args.run_dir).is_dir():
        raise ConfigError("RUN_DIR", args.run_dir, "not a directory; pass a run directory")
    if not 0 <= args.tolerance < 1:
        raise ConfigError("--tolerance", args.tolerance, "must be in [0, 1)")
    result = audit_run(args.run_dir, args.tolerance)
    print(json.dumps(result.to_json(), indent=1, default=str) if args.json else result.table())
    return 0 if result.ok else 1


def _empirical(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedpeft.sim.audit import audit_target

    if not Path(args.run_dir).exists():
        raise ConfigError("RUN_DIR", args.run_dir, "not found; pass a run directory or a config file")
    if args.canaries < 10:
        raise ConfigError("--canaries", args.canaries, "must be >= 10")
    if not 0 < args.beta < 1:
        raise ConfigError("--beta", args.beta, "must be in (0, 1)")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", args.steps, "must be >= 1")
    try:
        result = audit_target(args.run_dir, canaries=args.canaries, beta=args.beta, steps=args.steps,
                              score=args.score, audit_seed=args.seed)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError("RUN_DIR", args.run_dir, str(exc)) from None
    print(json.dumps(result.to_json(), indent=1, default=str) if args.json else "\n".join(result.lines()))
    return 0 if result.ok else 1


def _run(args: argparse.Namespace) -> int:
    if args.privacy_command == "plan":
        return _plan(args)
    if args.privacy_command == "audit":
        return _audit(args)
    raise ConfigError("privacy", args.privacy_command, "choose an action: plan or audit")


register_command("privacy", "plan a DP budget, or audit a run's epsilon with independent accountants", _add_args, _run)
