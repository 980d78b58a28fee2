"""Report of a compare sweep: ``results.csv``, ``report.md``, ``report.html`` and the plots.

Everything is read back from the cells' run directories (``metrics.jsonl``, ``cell.json``),
so a report can be regenerated at any time, also for a partly finished sweep (unfinished
cells are listed as such, never averaged in). ``report.html`` is self-contained: the PNGs
are embedded as base64 data URIs. The plain-language reading compares methods only where
every method has finished seeds at that epsilon, and calls a difference real only when it
exceeds the spread over seeds.

Runs are judged by their task type's primary metric (:mod:`fedpeft.tasks`; sequence
classification: ``accuracy``, higher is better): the columns are ``final_<metric>``,
``best_<metric>`` and ``<metric>_mean`` / ``<metric>_std``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.server.figures import fmt as _fmt
from fedpeft.server.figures import html_table as _html_table
from fedpeft.sim.compare.plots import write_plots
from fedpeft.sim.compare.sweep import Cell, cell_is_finished
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.registry import DEFAULT, get, task_for

__all__ = ["CSV_FIELDS", "collect", "csv_fields", "summary_cols", "write_report"]


def csv_fields(metric: str) -> tuple[str, ...]:
    """Columns of results.csv for runs judged by ``metric``."""
    return ("method", "epsilon_target", "epsilon_spent", "delta", "seed", f"final_{metric}", f"best_{metric}",
            "rounds", "bytes_up", "wall_s", "accountant", "epsilon_client_level", "run_dir")


CSV_FIELDS = csv_fields(get(DEFAULT).primary_metric)  # of the default task type (accuracy)


def _task_type(cells: Sequence[Cell]) -> TaskType:
    """The sweep's task type (every cell shares its base configuration's)."""
    return task_for(cells[0].cfg) if cells else get(DEFAULT)


def _f(value: Any) -> float:
    return float(value) if value is not None else math.nan


def collect(cells: Sequence[Cell]) -> tuple[list[dict[str, Any]], dict[tuple[str, float], list[list[dict[str, Any]]]],
                                            list[Cell]]:
    """(results rows of finished cells, metrics rows per (method, epsilon), unfinished cells)."""
    task_type = _task_type(cells)
    metric, best = task_type.primary_metric, (max if task_type.higher_is_better else min)
    results: list[dict[str, Any]] = []
    curves: dict[tuple[str, float], list[list[dict[str, Any]]]] = defaultdict(list)
    missing: list[Cell] = []
    for cell in cells:
        if not cell_is_finished(cell):
            missing.append(cell)
            continue
        rows = [json.loads(x) for x in (cell.path / "metrics.jsonl").read_text().splitlines() if x.strip()]
        info_path = cell.path / "cell.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        wall = _f(info.get("wall_s")) if info.get("status") == "finished" else sum(_f(r.get("seconds")) for r in rows)
        last = rows[-1]
        results.append({
            "method": cell.method, "epsilon_target": cell.epsilon,
            "epsilon_spent": _f(last.get("epsilon")) if math.isfinite(cell.epsilon) else math.inf,
            "delta": _f(last.get("delta")), "seed": cell.seed,
            f"final_{metric}": _f(last[metric]), f"best_{metric}": best(_f(r[metric]) for r in rows),
            "rounds": len(rows), "bytes_up": int(sum(int(r.get("bytes_up", 0)) for r in rows)), "wall_s": wall,
            "accountant": last.get("accountant", ""),
            "epsilon_client_level": _f(last.get("epsilon_client_level")) if "epsilon_client_level" in last else "",
            "run_dir": cell.path.name,
        })
        curves[(cell.method, cell.epsilon)].append(rows)
    return results, dict(curves), missing


def _summary(results: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, epsilon target)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["epsilon_target"])].append(r)
    out = []
    for (method, eps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        final = [r[f"final_{metric}"] for r in rs]
        out.append({"method": method, "epsilon_target": eps, "seeds": len(rs),
                    f"{metric}_mean": float(np.mean(final)), f"{metric}_std": float(np.std(final)),
                    "best_mean": float(np.mean([r[f"best_{metric}"] for r in rs])),
                    "epsilon_spent_max": max(r["epsilon_spent"] for r in rs),
                    "bytes_up_mean": float(np.mean([r["bytes_up"] for r in rs])),
                    "wall_s_mean": float(np.mean([r["wall_s"] for r in rs]))})
    return out


def _reading(summary: Sequence[dict[str, Any]], baseline: float | None, task_type: TaskType) -> list[str]:
    """Plain-language sentences, each backed by the table."""
    metric, sign = task_type.primary_metric, (1.0 if task_type.higher_is_better else -1.0)
    mean, std = f"{metric}_mean", f"{metric}_std"
    by = {(s["method"], s["epsilon_target"]): s for s in summary}
    methods = sorted({s["method"] for s in summary})
    epsilons = sorted({s["epsilon_target"] for s in summary}, reverse=True)
    lines = []
    if baseline is not None and task_type.baseline_note:
        lines.append(task_type.baseline_note.format(value=baseline))
    for eps in epsilons:
        here = [by[(m, eps)] for m in methods if (m, eps) in by]
        if len(here) < 2:
            continue
        best, runner = sorted(here, key=lambda s: -sign * s[mean])[:2]
        gap = sign * (best[mean] - runner[mean])
        spread = max(best[std], runner[std])
        where = "without DP" if math.isinf(eps) else f"at epsilon = {eps:g}"
        verdict = ("a difference larger than the spread over seeds" if gap > spread
                   else f"within the spread over seeds ({spread:.3f}), so not a clear win")
        lines.append(f"{where[0].upper() + where[1:]}: {best['method']} {best[mean]:.3f} vs {runner['method']} "
                     f"{runner[mean]:.3f} ({best['seeds']}/{runner['seeds']} seeds): {verdict}.")
    for m in methods:
        if (m, math.inf) in by:
            ref = by[(m, math.inf)][mean]
            drops = [f"{sign * (ref - by[(m, e)][mean]):+.3f} at {e:g}" for e in epsilons
                     if math.isfinite(e) and (m, e) in by]
            if drops:
                lines.append(f"{m}: {metric} lost against no DP: " + ", ".join(d.replace("+-", "-") for d in drops)
                             + " (positive = worse under DP).")
    return lines


def _md_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def summary_cols(metric: str) -> tuple[str, ...]:
    """Columns of the report's summary table for runs judged by ``metric``."""
    return ("method", "epsilon_target", "seeds", f"{metric}_mean", f"{metric}_std", "best_mean",
            "epsilon_spent_max", "bytes_up_mean", "wall_s_mean")


def write_report(cells: Sequence[Cell], out: Path, title: str = "fedpeft compare",
                 baseline: float | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write results.csv, the plots, report.md and report.html into ``out``; return their paths.

    ``baseline``: the primary metric of a model that learned nothing (the task type's
    :meth:`~fedpeft.tasks.base.TaskType.baseline`), named in the reading when given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task_type = _task_type(cells)
    metric = task_type.primary_metric
    fields, cols = csv_fields(metric), summary_cols(metric)
    results, curves, missing = collect(cells)
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
    plots = write_plots(results, curves, out / "plots", metric)
    summary = _summary(results, metric)
    reading = _reading(summary, baseline, task_type)
    unit = ("epsilon is example-level (one training example of one client), replace-one neighbours (each "
            "client's example count is public), the max over clients, at the delta in results.csv; accountant as "
            "named")
    md = [f"# {title}", "", f"{len(results)} of {len(cells)} runs finished. {unit}.", *[f"{n}" for n in notes], "",
          "## Reading", "", *[f"- {x}" for x in reading], "", "## Summary (over seeds)", "",
          *_md_table(summary, cols), "", "## Plots", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    md += ["", "## All runs", "", *_md_table(results, fields)]
    if missing:
        md += ["", "## Not finished", "", *[f"- {c.name}" for c in missing]]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    imgs = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem}</figcaption></figure>" for p in plots)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(results)} of {len(cells)} runs finished. {html.escape(unit)}.</p>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
            + "<h2>Reading</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in reading) + "</ul>"
            + "<h2>Summary (over seeds)</h2>" + _html_table(summary, cols) + "<h2>Plots</h2>" + imgs
            + "<h2>All runs</h2>" + _html_table(results, fields)
            + ("<h2>Not finished</h2><ul>" + "".join(f"<li>{html.escape(c.name)}</li>" for c in missing) + "</ul>"
               if missing else "")
            + "</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return {"csv": out / "results.csv", "md": out / "report.md", "html": out / "report.html",
            **{p.stem: p for p in plots}}

