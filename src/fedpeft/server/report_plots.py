"""The PNGs of one run's report (:mod:`fedpeft.server.report`), drawn from the run directory's rows.

* ``metrics_per_round.png`` -- the task type's primary metric (seq-cls: accuracy; causal-lm:
  exact match; per task in a multi-task run; round 0 = ``initial_eval.json`` where the task
  type scores the initial model) and the test loss (and the clients' training loss, reported
  only without DP) after each round;
* ``epsilon_per_client.png`` -- example-level epsilon each client has spent after each round,
  with its target dashed (up to :data:`MAX_CLIENT_LINES` clients one line each; more: the
  spread over clients, min / median / max);
* ``bytes_per_round.png`` -- payload bytes up (all replies) and down (all instructions) per round;
* ``client_timeline.png`` -- heterogeneous-device runs (``hetero_timeline.jsonl``): per client,
  download / compute / upload on the simulated clock, and the dropped ones. The heterogeneous
  emulator's own plots (:mod:`fedpeft.sim.hetero.plots`) draw it with the same function.

Every function takes plain rows (dicts as read from the JSON files), so an old run directory
can be drawn again without the code that wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.server.figures import plt, save_figure

__all__ = ["DROPPED", "MAX_CLIENT_LINES", "MAX_TIMELINE_CLIENTS", "PHASES", "byte_unit", "bytes_per_round",
           "client_timeline", "epsilon_per_client", "metrics_per_round", "number"]

# compute is the server's cost-model estimate scaled to the device (sim/hetero/timing.py), not a client measurement
PHASES = (("download_s", "downloading", "#9ecae1"), ("compute_s", "computing (estimated)", "#3182bd"),
          ("upload_s", "uploading", "#31a354"))
DROPPED = {"late": "#fd8d3c", "surplus": "#bdbdbd", "crashed": "#de2d26", "offline": "#636363",
           "declined": "#756bb1"}
MAX_TIMELINE_CLIENTS = 60
MAX_CLIENT_LINES = 20


def number(value: Any) -> float:
    """A metrics value as a float: JSON's ``"inf"`` / ``"nan"`` strings (:func:`fedpeft.server.run_dir.jsonable`)
    included; None and anything else unreadable is NaN."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _round_axis(ax: Any, rounds: Sequence[int]) -> None:
    ax.set_xlabel("round")
    if rounds and max(rounds) <= 20:
        ax.set_xticks(sorted(set(rounds)))
    ax.grid(alpha=0.3)


def metrics_per_round(rows: Sequence[Mapping[str, Any]], metric: str, out: Path,
                      initial: Mapping[str, Any] | None = None) -> Path:
    """Primary ``metric`` (left) and losses (right) per round; ``initial``: round-0 metrics, if any."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    first = [dict(initial)] if initial else []
    series = [*first, *rows]
    rounds = [int(r["round"]) for r in series]
    left.plot(rounds, [number(r.get(metric)) for r in series], marker="o", color="#3182bd", label="all test data")
    per_task = [r.get(f"{metric}_per_task") for r in series]
    if any(isinstance(p, dict) for p in per_task):
        for task in sorted({t for p in per_task if isinstance(p, dict) for t in p}):
            vals = [number(p.get(task)) if isinstance(p, dict) else math.nan for p in per_task]
            left.plot(rounds, vals, marker=".", ls="--", lw=1, label=task)
    skipped = [int(r["round"]) for r in rows if r.get("skipped")]
    if skipped:
        by_round = {int(r["round"]): number(r.get(metric)) for r in rows}
        left.scatter(skipped, [by_round[s] for s in skipped], marker="x", s=60, color="#de2d26", zorder=3,
                     label="skipped round (state unchanged)")
    left.set_ylabel(f"test {metric}")
    left.set_title(f"{metric} per round" + (" (round 0: initial model)" if initial else ""))
    _round_axis(left, rounds)
    left.legend(fontsize=7)
    right.plot(rounds, [number(r.get("loss")) for r in series], marker="o", color="#e6550d", label="test loss")
    train = [number(r.get("train_loss")) for r in rows]
    if any(math.isfinite(v) for v in train):
        right.plot([int(r["round"]) for r in rows], train, marker="s", ls="--", color="#756bb1",
                   label="clients' training loss (mean)")
    right.set_ylabel("loss")
    right.set_title("Loss per round")
    _round_axis(right, rounds)
    right.legend(fontsize=7)
    return save_figure(fig, out / "metrics_per_round.png")


def _client_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Epsilon of each client after each round (NaN before its first reply)."""
    clients: set[str] = set()
    for r in rows:
        per = r.get("epsilon_per_client")
        if isinstance(per, dict):
            clients.update(per)
    curves: dict[str, list[float]] = {}
    for c in sorted(clients, key=lambda c: (len(c), c)):  # numeric ids in numeric order
        curves[c] = [number(r["epsilon_per_client"].get(c)) if isinstance(r.get("epsilon_per_client"), dict)
                     else math.nan for r in rows]
    return curves


def epsilon_per_client(rows: Sequence[Mapping[str, Any]], targets: Mapping[str, float], out: Path) -> Path:
    """Each client's epsilon spent per round against its target (``targets``: client -> target;
    a key ``"*"`` is the target of every client without its own)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    rounds = [int(r["round"]) for r in rows]
    curves = _client_curves(rows)
    default = targets.get("*", math.nan)
    few = len(curves) <= MAX_CLIENT_LINES
    if few:
        for client, ys in curves.items():
            line = ax.plot(rounds, ys, marker="o", ms=3, label=f"client {client}")
            own = targets.get(client)
            if own is not None and math.isfinite(own) and own != default:
                ax.axhline(own, ls="--", lw=0.8, color=line[0].get_color())
    elif curves:
        table = np.array(list(curves.values()), dtype=float)
        with np.errstate(all="ignore"):
            lo, mid, hi = np.nanmin(table, 0), np.nanmedian(table, 0), np.nanmax(table, 0)
        ax.fill_between(rounds, lo, hi, alpha=0.3, color="#3182bd", label=f"min-max over {len(curves)} clients")
        ax.plot(rounds, mid, marker="o", color="#3182bd", label="median client")
        ax.plot(rounds, hi, lw=0.8, color="#08519c", label="largest")
    if math.isfinite(default):
        ax.axhline(default, ls="--", lw=1.2, color="k", label=f"target {default:g}")
    own_targets = {c: t for c, t in targets.items() if c != "*" and math.isfinite(t) and t != default}
    if own_targets and not few:
        for i, t in enumerate(sorted(set(own_targets.values()))):
            ax.axhline(t, ls=":", lw=0.8, color="k", label="clients' own targets" if i == 0 else None)
    ax.set_ylabel("epsilon spent (example-level)")
    ax.set_title("Epsilon per client per round (dashed: target)")
    _round_axis(ax, rounds)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1, loc="lower right")
    return save_figure(fig, out / "epsilon_per_client.png")


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the largest binary unit not above ``largest`` bytes (bytes, KiB, MiB, GiB)."""
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return float(scale), name
    return 1.0, "bytes"


def bytes_per_round(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Payload bytes up and down per round, as bars side by side."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    rounds = [int(r["round"]) for r in rows]
    up = [number(r.get("bytes_up")) for r in rows]
    down = [number(r.get("bytes_down")) for r in rows]
    scale, unit = byte_unit(max([v for v in up + down if math.isfinite(v)], default=0.0))
    ax.bar([x - 0.2 for x in rounds], [v / scale for v in up], width=0.4, color="#31a354", label="up (all replies)")
    ax.bar([x + 0.2 for x in rounds], [v / scale for v in down], width=0.4, color="#9ecae1",
           label="down (all instructions)")
    ax.set_ylabel(unit)
    ax.set_title("Payload per round")
    _round_axis(ax, rounds)
    ax.legend(fontsize=8)
    return save_figure(fig, out / "bytes_per_round.png")


def client_timeline(rows: Sequence[Mapping[str, Any]], timeline: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Per client (first :data:`MAX_TIMELINE_CLIENTS`): its phases in each round, rounds laid end to end
    on the simulated clock (``sim_seconds`` of the rows); ``timeline``: ``hetero_timeline.jsonl`` rows."""
    starts: dict[int, float] = {}
    clock = 0.0
    for r in rows:
        starts[int(r["round"])] = clock
        clock += number(r.get("sim_seconds")) if math.isfinite(number(r.get("sim_seconds"))) else 0.0
    clients = sorted({str(e["client"]) for e in timeline}, key=lambda c: (len(c), c))[:MAX_TIMELINE_CLIENTS]
    ypos = {c: i for i, c in enumerate(clients)}
    profile = {str(e["client"]): str(e.get("profile", "")) for e in timeline}
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.28 * max(len(clients), 3)))
    for e in timeline:
        client, rnd = str(e["client"]), int(e["round"])
        if client not in ypos or rnd not in starts:
            continue
        y, t = ypos[client], starts[rnd]
        if e.get("status") in DROPPED:
            ax.broken_barh([(t, max(number(e.get("end_s")), clock * 0.004))], (y - 0.35, 0.7),
                           color=DROPPED[str(e["status"])])
            continue
        for attr, _, color in PHASES:
            width = number(e.get(attr))
            ax.broken_barh([(t, width)], (y - 0.35, 0.7), color=color)
            t += width
    for r in rows[1:]:
        ax.axvline(starts[int(r["round"])], color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(clients)), [f"{c} {profile[c]}" for c in clients], fontsize=7)
    ax.set(xlabel="simulated seconds (white = idle)", title="Client timeline (rounds separated by dotted lines)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in PHASES] + \
        [plt.Rectangle((0, 0), 1, 1, color=c) for c in DROPPED.values()]
    labels = [n for _, n, _ in PHASES] + [f"dropped: {s}" for s in DROPPED]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out / "client_timeline.png")
