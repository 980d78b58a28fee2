"""Report of a compare sweep: ``results.csv``, ``report.md``, ``report.html`` and the plots.

Everything is read back from the cells' run directories (``metrics.jsonl``, ``cell.json``),
so a report can be regenerated at any time, also for a partly finished sweep (unfinished
cells are listed as such, never averaged in). ``report.html`` is self-contained: the PNGs
are embedded as base64 data URIs. The plain-language reading compares methods only where
every method has finished seeds at that epsilon, and calls a difference real only when it
exceeds the spread over seeds.

Runs are judged by their task type's primary metric (:mod:`fedpeft.tasks`; sequence
classification: ``accuracy``, higher is better): the columns are ``final_<metric>``,
``best_<metric>`` and ``<metric>_mean`` / ``<metric>_std``. A method whose clients keep part
of the model (FedSA-LoRA's B) is judged by ``personal_<metric>`` of its last round instead --
the clients' accounted evaluation of their own models on held-out splits of their data
(:mod:`fedpeft.client.personal_eval`); ``judged_by`` in ``results.csv`` names the metric of
every run (its ``best_`` is then its final value: there is one such evaluation per run).
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
from fedpeft.sim.compare.stats import paired_rows
from fedpeft.sim.compare.sweep import Cell, cell_is_finished, judged_metric
from fedpeft.sim.compare.tuning import choose_lrs, tuning_rows
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.registry import DEFAULT, get, task_for

__all__ = ["CSV_FIELDS", "PAIRED_COLS", "collect", "csv_fields", "summary_cols", "write_report"]


def csv_fields(metric: str) -> tuple[str, ...]:
    """Columns of results.csv for runs judged by ``metric``."""
    return ("method", "epsilon_target", "epsilon_spent", "delta", "seed", "lr", f"final_{metric}", f"best_{metric}",
            "rounds", "bytes_up", "wall_s", "accountant", "epsilon_client_level", "judged_by", "run_dir")


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
        # a method whose clients keep part of the model is judged by their accounted personalised
        # evaluation of the last round (fedpeft.client.personal_eval), not by the server's model
        judged = judged_metric(last, metric)
        results.append({
            "method": cell.method, "epsilon_target": cell.epsilon,
            "epsilon_spent": _f(last.get("epsilon")) if math.isfinite(cell.epsilon) else math.inf,
            "delta": _f(last.get("delta")), "seed": cell.seed, "lr": cell.cfg.train.lr,
            f"final_{metric}": _f(last[judged]),
            f"best_{metric}": _f(last[judged]) if judged != metric else best(_f(r[metric]) for r in rows),
            "rounds": len(rows), "bytes_up": int(sum(int(r.get("bytes_up", 0)) for r in rows)), "wall_s": wall,
            "accountant": last.get("accountant", ""),
            "epsilon_client_level": _f(last.get("epsilon_client_level")) if "epsilon_client_level" in last else "",
            "judged_by": judged if judged == metric else f"{judged} (clients' held-out splits, last round)",
            "run_dir": cell.path.name,
        })
        curves[(cell.method, cell.epsilon)].append(rows)
    return results, dict(curves), missing


def _summary(results: Sequence[dict[str, Any]], metric: str, reference: str) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, epsilon target); the learning rate(s) used; upload
    bytes per run and their ratio to ``reference``'s at the same epsilon."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["epsilon_target"])].append(r)
    out = []
    for (method, eps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        final = [r[f"final_{metric}"] for r in rs]
        ref = [r["bytes_up"] for r in groups.get((reference, eps), [])]
        out.append({"method": method, "epsilon_target": eps, "seeds": len(rs),
                    "lr": ",".join(f"{lr:g}" for lr in sorted({r["lr"] for r in rs})),
                    f"{metric}_mean": float(np.mean(final)), f"{metric}_std": float(np.std(final, ddof=1))
                    if len(final) > 1 else math.nan,
                    "best_mean": float(np.mean([r[f"best_{metric}"] for r in rs])),
                    "epsilon_spent_max": max(r["epsilon_spent"] for r in rs),
                    "bytes_up_mean": float(np.mean([r["bytes_up"] for r in rs])),
                    f"upload_vs_{reference}": float(np.mean([r["bytes_up"] for r in rs]) / np.mean(ref))
                    if ref and np.mean(ref) > 0 else math.nan,
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
        spread = max((x for x in (best[std], runner[std]) if math.isfinite(x)), default=0.0)
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


def summary_cols(metric: str, reference: str = "ffa_lora") -> tuple[str, ...]:
    """Columns of the report's summary table for runs judged by ``metric``."""
    return ("method", "epsilon_target", "seeds", "lr", f"{metric}_mean", f"{metric}_std", "best_mean",
            "epsilon_spent_max", "bytes_up_mean", f"upload_vs_{reference}", "wall_s_mean")


PAIRED_COLS = ("epsilon_target", "method", "reference", "pairs", "diff_mean", "diff_std", "p_t", "p_sign_flip",
               "p_sign_flip_min", "better")
TUNING_NOTE = ("The learning rate of each (method, epsilon) was chosen from its grid by the final {metric} on a "
               "validation split held out of the training pool (no client trains on it), in tuning runs with "
               "seed {seed}; the test split never took part. A method judged by its clients' personalised "
               "evaluation (judged_by personal_{metric}: FedSA-LoRA) was tuned on that metric instead, measured on "
               "the clients' held-out splits of their own training data. Every evaluation seed then ran with the "
               "chosen rate.")


def _paired_reading(paired: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """One sentence per paired comparison, naming the winner only when p < 0.05."""
    lines = []
    for r in paired:
        where = "without DP" if math.isinf(r["epsilon_target"]) else f"at epsilon = {r['epsilon_target']:g}"
        significant = r["p_t"] < 0.05 or r["p_sign_flip"] < 0.05
        verdict = (f"{r['better']} is better (p < 0.05)" if significant and r["better"] != "tie"
                   else "no significant difference")
        lines.append(f"{where[0].upper() + where[1:]}: {r['method']} - {r['reference']} = {r['diff_mean']:+.3f} "
                     f"{metric} over {r['pairs']} paired seeds (paired t p = {_fmt(r['p_t'])}, exact sign-flip "
                     f"p = {_fmt(r['p_sign_flip'])}, smallest possible {_fmt(r['p_sign_flip_min'])}): {verdict}.")
    return lines


def _md_section(title: str, body: Sequence[str]) -> list[str]:
    return ["", f"## {title}", "", *body]


def write_report(cells: Sequence[Cell], out: Path, title: str = "fedpeft compare",
                 baseline: float | None = None, notes: Sequence[str] = (), tuning: Sequence[Cell] = (),
                 reference: str = "ffa_lora") -> dict[str, Path]:
    """Write results.csv, paired.csv, tuning.csv (a tuning sweep), the plots, report.md and
    report.html into ``out``; return their paths.

    ``baseline``: the primary metric of a model that learned nothing (the task type's
    :meth:`~fedpeft.tasks.base.TaskType.baseline`), named in the reading when given;
    ``tuning``: the sweep's tuning cells (:mod:`fedpeft.sim.compare.tuning`); ``reference``:
    the method every other is tested against (paired by seed, per epsilon), the first
    method of the cells when it has none."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task_type = _task_type(cells)
    metric = task_type.primary_metric
    results, curves, missing = collect(cells)
    if cells and reference not in {c.method for c in cells}:
        reference = cells[0].method
    fields, cols = csv_fields(metric), summary_cols(metric, reference)
    _write_csv(out / "results.csv", fields, results)
    paired = paired_rows(results, metric, reference, task_type.higher_is_better)
    _write_csv(out / "paired.csv", PAIRED_COLS, paired)
    choices = choose_lrs(tuning)
    tune_rows = tuning_rows(tuning, choices)
    paths = {"csv": out / "results.csv", "paired": out / "paired.csv"}
    if tune_rows:
        paths["tuning"] = out / "tuning.csv"
        _write_csv(paths["tuning"], list(tune_rows[0]), tune_rows)
    plots = write_plots(results, curves, out / "plots", metric)
    summary = _summary(results, metric, reference)
    reading = _reading(summary, baseline, task_type) + _paired_reading(paired, metric)
    unit = ("epsilon is example-level (one training example of one client), replace-one neighbours (each "
            "client's example count is public), the max over clients, at the delta in results.csv; accountant as "
            "named; std is the sample standard deviation over seeds; bytes_up is what all clients uploaded in "
            "one run")
    n_seeds = sorted({r["pairs"] for r in paired})
    power = (f"Paired tests against {reference} over {', '.join(map(str, n_seeds))} seeds: with so few seeds "
             "they have little power (the exact sign-flip test cannot give p below 2/2^n), and they are not "
             "corrected for the number of comparisons; a p above 0.05 means these seeds cannot tell the "
             "methods apart, not that they are equal.") if paired else ""
    waiting = sorted({(c.method, c.epsilon) for c in tuning} - set(choices), key=lambda k: (k[0], -k[1]))
    notes = [*notes, *([TUNING_NOTE.format(metric=metric, seed=tuning[0].seed)] if tuning else []),
             *(["Not run yet, waiting for every tuning cell of their grid to finish: the evaluation runs of "
                + ", ".join(f"{m} at epsilon {_fmt(e)}" for m, e in waiting) + "."] if waiting else [])]
    tune_cols = list(tune_rows[0]) if tune_rows else []
    sections: list[tuple[str, str, list[str]]] = [  # (title, html, markdown lines)
        ("Reading", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in reading) + "</ul>",
         [f"- {x}" for x in reading]),
        ("Summary (over seeds)", _html_table(summary, cols), _md_table(summary, cols)),
        (f"Paired comparison with {reference} (per epsilon, by seed)",
         f"<p>{html.escape(power)}</p>" + _html_table(paired, PAIRED_COLS), [power, "", *_md_table(paired, PAIRED_COLS)]),
    ]
    if tuning:
        sections.append(("Learning rate chosen on the validation split", _html_table(tune_rows, tune_cols),
                         _md_table(tune_rows, tune_cols)))
    md = [f"# {title}", "", f"{len(results)} of {len(cells)} runs finished. {unit}.", *notes]
    for name, _, lines in sections:
        md += _md_section(name, lines)
    md += _md_section("Plots", [f"![{p.stem}](plots/{p.name})" for p in plots])
    md += _md_section("All runs", _md_table(results, fields))
    if missing:
        md += _md_section("Not finished", [f"- {c.name}" for c in missing])
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
            + "".join(f"<h2>{html.escape(name)}</h2>{body}" for name, body, _ in sections)
            + "<h2>Plots</h2>" + imgs + "<h2>All runs</h2>" + _html_table(results, fields)
            + ("<h2>Not finished</h2><ul>" + "".join(f"<li>{html.escape(c.name)}</li>" for c in missing) + "</ul>"
               if missing else "")
            + "</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return {**paths, "md": out / "report.md", "html": out / "report.html", **{p.stem: p for p in plots}}


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
