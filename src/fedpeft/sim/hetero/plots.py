"""Plots of a heterogeneous run (matplotlib, Agg backend, PNG).

* ``sim_time_per_round.png`` -- simulated vs real seconds per round (real = the server's
  own wall time per round, the ``seconds`` of ``metrics.jsonl``);
* ``client_timeline.png`` -- per client: download / compute / upload, idle, and the
  dropped ones (late, surplus, crashed, offline, declined), rounds laid end to end on the
  simulated clock (:func:`fedpeft.server.report_plots.client_timeline`, which the run's
  ``report.html`` draws too);
* ``<metric>_vs_sim_time.png`` -- the task type's primary metric (``accuracy`` for sequence
  classification) on the test set against the simulated clock;
* ``participation.png`` -- outcomes per profile over the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedpeft.server.figures import plt
from fedpeft.server.figures import save_figure as _save
from fedpeft.server.report_plots import DROPPED, client_timeline

__all__ = ["write_plots"]


def _sim_time(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rounds = [r["round"] for r in rows]
    ax.bar([x - 0.2 for x in rounds], [r["sim_seconds"] for r in rows], width=0.4, label="simulated")
    ax.bar([x + 0.2 for x in rounds], [r["seconds"] for r in rows], width=0.4, label="real (server wall time)")
    ax.set(xlabel="round", ylabel="seconds", title="Round time: simulated devices vs this host")
    ax.legend()
    return _save(fig, out / "sim_time_per_round.png")


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
    return [_sim_time(rows, out), client_timeline(rows, [asdict(e) for e in timeline], out), _metric(rows, out, metric),
            _participation(timeline, out)]
