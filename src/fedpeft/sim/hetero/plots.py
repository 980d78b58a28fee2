"""Plots of a heterogeneous run (matplotlib, Agg backend, PNG).

* ``sim_time_per_round.png`` -- simulated vs real seconds per round (real = the server's
  own wall time per round, the ``seconds`` of ``metrics.jsonl``);
* ``client_timeline.png`` -- per client: download / compute / upload, idle, and the
  dropped ones (late, surplus, crashed, offline, declined), rounds laid end to end on the
  simulated clock;
* ``<metric>_vs_sim_time.png`` -- the task type's primary metric (``accuracy`` for sequence
  classification) on the test set against the simulated clock;
* ``participation.png`` -- outcomes per profile over the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["write_plots"]

# compute is the server's cost-model estimate scaled to the device (timing.py), not a client measurement
PHASES = (("download_s", "downloading", "#9ecae1"), ("compute_s", "computing (estimated)", "#3182bd"),
          ("upload_s", "uploading", "#31a354"))
DROPPED = {"late": "#fd8d3c", "surplus": "#bdbdbd", "crashed": "#de2d26", "offline": "#636363",
           "declined": "#756bb1"}
MAX_TIMELINE_CLIENTS = 60


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sim_time(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rounds = [r["round"] for r in rows]
    ax.bar([x - 0.2 for x in rounds], [r["sim_seconds"] for r in rows], width=0.4, label="simulated")
    ax.bar([x + 0.2 for x in rounds], [r["seconds"] for r in rows], width=0.4, label="real (server wall time)")
    ax.set(xlabel="round", ylabel="seconds", title="Round time: simulated devices vs this host")
    ax.legend()
    return _save(fig, out / "sim_time_per_round.png")


def _timeline(rows: Sequence[dict[str, Any]], timeline: Sequence[Any], out: Path) -> Path:
    starts: dict[int, float] = {}
    clock = 0.0
    for r in rows:
        starts[r["round"]] = clock
        clock += r["sim_seconds"]
    clients = sorted({e.client for e in timeline}, key=int)[:MAX_TIMELINE_CLIENTS]
    ypos = {c: i for i, c in enumerate(clients)}
    profile = {e.client: e.profile for e in timeline}
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.28 * max(len(clients), 3)))
    for e in timeline:
        if e.client not in ypos or e.round not in starts:
            continue
        y, t0 = ypos[e.client], starts[e.round]
        if e.status in DROPPED:
            ax.broken_barh([(t0, max(e.end_s, clock * 0.004))], (y - 0.35, 0.7), color=DROPPED[e.status])
            continue
        t = t0
        for attr, _, color in PHASES:
            width = getattr(e, attr)
            ax.broken_barh([(t, width)], (y - 0.35, 0.7), color=color)
            t += width
    for r in rows[1:]:
        ax.axvline(starts[r["round"]], color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(clients)), [f"{c} {profile[c]}" for c in clients], fontsize=7)
    ax.set(xlabel="simulated seconds (white = idle)", title="Client timeline (rounds separated by dotted lines)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in PHASES] + \
        [plt.Rectangle((0, 0), 1, 1, color=c) for c in DROPPED.values()]
    labels = [n for _, n, _ in PHASES] + [f"dropped: {s}" for s in DROPPED]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "client_timeline.png")


def _metric(rows: Sequence[dict[str, Any]], out: Path, metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["sim_clock"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.set(xlabel="simulated clock (s)", ylabel=f"test {metric}", title=f"{metric.capitalize()} vs simulated time")
    ax.grid(alpha=0.3)
    return _save(fig, out / f"{metric}_vs_sim_time.png")


def _participation(timeline: Sequence[Any], out: Path) -> Path:
    counts = Counter((e.profile, e.status) for e in timeline)
    profiles = sorted({e.profile for e in timeline})
    statuses = ["accepted", *DROPPED]
    colors = {"accepted": "#3182bd", **DROPPED}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(profiles)
    for s in statuses:
        vals = [counts.get((p, s), 0) for p in profiles]
        if any(vals):
            ax.bar(profiles, vals, bottom=bottom, color=colors[s], label=s)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(ylabel="client-rounds selected", title="Participation per profile")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    return _save(fig, out / "participation.png")


def write_plots(rows: Sequence[dict[str, Any]], timeline: Sequence[Any], out: Path, metric: str) -> list[Path]:
    """Write the four PNGs into ``out`` (``metric``: the task type's primary metric); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    return [_sim_time(rows, out), _timeline(rows, timeline, out), _metric(rows, out, metric),
            _participation(timeline, out)]
