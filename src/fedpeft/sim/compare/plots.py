"""Plots of a compare sweep (matplotlib, Agg backend, PNG).

Plots are of the sweep's task type's primary metric (``<metric>`` below; ``accuracy`` for
sequence classification):

* ``<metric>_vs_epsilon.png`` -- its final test value against the epsilon target, one line
  per method (mean over seeds, error bar = standard deviation, dots = single seeds);
  no-DP (epsilon = inf) is drawn at the right end of the axis;
* ``epsilon_vs_round.png`` -- example-level epsilon spent (max over clients) after each
  round, per method and target (mean over seeds), targets dashed;
* ``<metric>_vs_round.png`` -- its test value after each round, per method and target;
* ``upload_bytes.png`` -- bytes uploaded by all clients over a whole run, per method.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.server.figures import plt
from fedpeft.server.figures import save_figure as _save

__all__ = ["write_plots"]


def _eps_positions(epsilons: Sequence[float]) -> dict[float, float]:
    """x position per epsilon: finite values as they are, inf one step past the largest."""
    finite = sorted(e for e in set(epsilons) if math.isfinite(e))
    pos = {e: e for e in finite}
    if any(math.isinf(e) for e in epsilons):
        top = finite[-1] if finite else 1.0
        pos[math.inf] = top + max(1.0, 0.25 * top)
    return pos


def _metric_vs_epsilon(results: Sequence[dict[str, Any]], out: Path, metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    pos = _eps_positions([r["epsilon_target"] for r in results])
    methods = sorted({r["method"] for r in results})
    width = 0.04 * (max(pos.values()) - min(pos.values()) or 1.0)
    for i, method in enumerate(methods):
        shift = (i - (len(methods) - 1) / 2) * width
        by_eps: dict[float, list[float]] = defaultdict(list)
        for r in results:
            if r["method"] == method:
                by_eps[r["epsilon_target"]].append(r[f"final_{metric}"])
        xs = sorted(by_eps, key=lambda e: pos[e])
        means = [float(np.mean(by_eps[e])) for e in xs]
        stds = [float(np.std(by_eps[e], ddof=1)) if len(by_eps[e]) > 1 else 0.0 for e in xs]  # sample std
        line = ax.errorbar([pos[e] + shift for e in xs], means, yerr=stds, marker="o", capsize=4, label=method)
        for e in xs:
            ax.scatter([pos[e] + shift] * len(by_eps[e]), by_eps[e], s=12, alpha=0.5, color=line[0].get_color())
    ax.set_xticks(sorted(pos.values()))
    ax.set_xticklabels(["no DP" if math.isinf(e) else f"{e:g}" for e in sorted(pos, key=lambda e: pos[e])])
    ax.set_xlabel("epsilon target (example-level, per client)")
    ax.set_ylabel(f"final test {metric}")
    ax.set_title(f"{metric.capitalize()} against privacy budget (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / f"{metric}_vs_epsilon.png")


def _per_round(curves: dict[tuple[str, float], list[list[dict[str, Any]]]], key: str) -> dict[tuple[str, float], Any]:
    """Mean of ``key`` per round over the seeds of each (method, epsilon)."""
    out = {}
    for k, runs in curves.items():
        n = min(len(r) for r in runs)
        vals = np.array([[float(row[key]) for row in r[:n]] for r in runs], dtype=float)
        out[k] = (np.arange(1, n + 1), vals.mean(axis=0))
    return out


def _epsilon_vs_round(curves: dict[tuple[str, float], list[list[dict[str, Any]]]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    dp = {k: v for k, v in curves.items() if math.isfinite(k[1])}
    for (method, eps), (x, y) in sorted(_per_round(dp, "epsilon").items()):
        line = ax.plot(x, y, marker="o", label=f"{method}, target {eps:g}")
        ax.axhline(eps, ls="--", lw=0.8, color=line[0].get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (max over clients)")
    ax.set_title("Example-level epsilon spent per round (dashed: target)")
    ax.grid(alpha=0.3)
    if dp:
        ax.legend(fontsize=8)
    return _save(fig, out / "epsilon_vs_round.png")


def _metric_vs_round(curves: dict[tuple[str, float], list[list[dict[str, Any]]]], out: Path, metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, eps), (x, y) in sorted(_per_round(curves, metric).items()):
        ax.plot(x, y, marker="o", ls="-" if method == sorted({m for m, _ in curves})[0] else "--",
                label=f"{method}, eps {'inf' if math.isinf(eps) else f'{eps:g}'}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric} (mean over seeds)")
    ax.set_title(f"{metric.capitalize()} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / f"{metric}_vs_round.png")


def _upload_bytes(results: Sequence[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    methods = sorted({r["method"] for r in results})
    means = [float(np.mean([r["bytes_up"] for r in results if r["method"] == m])) / 2**20 for m in methods]
    bars = ax.bar(methods, means, color="#3182bd")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("MiB uploaded per run (all clients)")
    ax.set_title("Upload per method")
    return _save(fig, out / "upload_bytes.png")


def write_plots(results: Sequence[dict[str, Any]], curves: dict[tuple[str, float], list[list[dict[str, Any]]]],
                out: Path, metric: str) -> list[Path]:
    """Write the four PNGs into ``out``; ``results`` are results.csv rows (finished cells),
    ``curves`` the metrics rows of each run grouped by (method, epsilon target), ``metric``
    the task type's primary metric."""
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        return []
    return [_metric_vs_epsilon(results, out, metric), _epsilon_vs_round(curves, out),
            _metric_vs_round(curves, out, metric), _upload_bytes(results, out)]
