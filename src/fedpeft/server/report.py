"""``report.html`` of one run: what it learned, what it spent and sent, read from its run directory alone.

Written at the end of every run (:func:`fedpeft.server.loop.run_federation`, for simulated and
deployed runs alike, also after a run that failed part-way) and again at any time by ``fedpeft
report RUN_DIR``, also for a run directory an older fedpeft wrote. It reads only files of the
run directory (README, "What a run leaves behind"):

* ``metrics.jsonl`` -- every round's row (the only file it needs);
* ``config.toml`` -- what ran (task type, method, privacy target), read as plain TOML, so a
  configuration that no longer validates is still shown;
* ``ledger/client-<id>.json`` -- each client's own target and DP steps, where the clients'
  ledgers are in the run directory (a simulation; a deployment keeps them on the nodes);
* ``initial_eval.json`` -- the initial model's score (causal-LM), drawn as round 0;
* ``samples/round-NNN.jsonl`` -- the last round's sample answers (causal-LM);
* ``hetero_timeline.jsonl`` and ``plots/*.png`` -- a heterogeneous-device emulation.

It writes ``plots/metrics_per_round.png``, ``plots/epsilon_per_client.png`` (DP runs),
``plots/bytes_per_round.png``, ``plots/client_timeline.png`` (hetero runs) and ``report.html``,
which embeds every PNG as a data URI (one file: it can be mailed or opened offline). Nothing
in it comes from anywhere but these files.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.server import report_plots as rp
from fedpeft.server.figures import fmt, html_figure, html_page, html_table
from fedpeft.server.report_plots import number
from fedpeft.tasks.registry import get as get_task_type

__all__ = ["PLOTS_DIR", "REPORT_FILE", "RunFiles", "read_run", "write_report", "write_report_safely"]

log = logging.getLogger("fedpeft.report")

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
REPORT_PLOTS = ("metrics_per_round", "epsilon_per_client", "bytes_per_round", "client_timeline")
MAX_SAMPLES = 6


@dataclass
class RunFiles:
    """What a run directory holds, as plain data (``notes``: files that were there but unreadable)."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_file: str = ""
    notes: list[str] = field(default_factory=list)


def _jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The objects of a JSONL file; a line that does not parse (a crash mid-write) is skipped with a note."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {i} is not JSON (skipped)")
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def read_run(path: Path) -> RunFiles:
    """Read the run directory at ``path``; ValueError (one line) if it has no round in ``metrics.jsonl``."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl, not a run directory (or no round has finished yet)")
    notes: list[str] = []
    rows = [r for r in _jsonl(metrics, notes) if isinstance(r.get("round"), int)]
    if not rows:
        raise ValueError(f"{path}: metrics.jsonl holds no round yet")
    run = RunFiles(path, rows, notes=notes)
    cfg = path / "config.toml"
    if cfg.is_file():
        try:
            run.config = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            notes.append(f"config.toml does not parse ({exc})")
    for ledger in sorted((path / "ledger").glob("client-*.json")):
        try:
            raw = json.loads(ledger.read_text(encoding="utf-8"))
            run.ledgers[str(raw["client"])] = raw
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            notes.append(f"ledger/{ledger.name} is not a ledger (skipped)")
    if (path / "hetero_timeline.jsonl").is_file():
        run.timeline = _jsonl(path / "hetero_timeline.jsonl", notes)
    if (path / "initial_eval.json").is_file():
        try:
            run.initial = json.loads((path / "initial_eval.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            notes.append("initial_eval.json is not JSON (skipped)")
    rounds = sorted((path / "samples").glob("round-*.jsonl"))
    if rounds:
        run.samples, run.samples_file = _jsonl(rounds[-1], notes), f"samples/{rounds[-1].name}"
    return run


def _section(name: str, key: str, value: Any, default: Any = None) -> Any:
    """``config[name][key]`` of a raw configuration mapping (``default`` when absent)."""
    return value.get(name, {}).get(key, default) if isinstance(value.get(name), dict) else default


def _metrics(run: RunFiles) -> tuple[tuple[str, ...], bool]:
    """The task type's metric names (primary first) and whether higher is better; a task type
    that is not registered here: the first known metric found in the rows."""
    try:
        task_type = get_task_type(str(run.config.get("task_type", "seq-cls")))
        return tuple(task_type.metric_names), bool(task_type.higher_is_better)
    except KeyError:
        found = tuple(m for m in ("accuracy", "exact_match", "loss") if m in run.rows[-1])
        return (found or ("loss",)), found[:1] != ("loss",) and bool(found)


def _targets(run: RunFiles) -> dict[str, float]:
    """Epsilon target per client (its ledger's) and ``"*"``: the configured one."""
    out = {c: number(raw.get("target_epsilon")) for c, raw in run.ledgers.items()}
    out["*"] = number(_section("privacy", "epsilon", run.config, math.inf))
    return out


def _dp(run: RunFiles) -> bool:
    return any(math.isfinite(number(r.get("epsilon"))) for r in run.rows) or \
        math.isfinite(number(_section("privacy", "epsilon", run.config, math.inf)))


def _draw(run: RunFiles, metric: str) -> list[Path]:
    """The report's PNGs into ``plots/`` (each one that applies to this run)."""
    out = run.path / PLOTS_DIR
    out.mkdir(exist_ok=True)
    paths = [rp.metrics_per_round(run.rows, metric, out, run.initial)]
    if _dp(run):
        paths.append(rp.epsilon_per_client(run.rows, _targets(run), out))
    paths.append(rp.bytes_per_round(run.rows, out))
    if run.timeline:
        paths.append(rp.client_timeline(run.rows, run.timeline, out))
    return paths


def _summary(run: RunFiles, names: tuple[str, ...], higher: bool) -> list[dict[str, Any]]:
    """(what, value) rows of the summary table."""
    rows, metric = run.rows, names[0]
    last = rows[-1]
    values = [(number(r.get(metric)), int(r["round"])) for r in rows if math.isfinite(number(r.get(metric)))]
    best = (max if higher else min)(values) if values else (math.nan, 0)
    out: list[tuple[str, Any]] = [
        ("rounds finished", f"{len(rows)} of {_section('train', 'rounds', run.config, '?')}"),
        *[(f"final test {n}", number(last.get(n))) for n in names],
        (f"best test {metric}", f"{fmt(best[0])} (round {best[1]})"),
    ]
    if run.initial is not None:
        out.append((f"initial model's {metric} (round 0)", number(run.initial.get(metric))))
    target = number(_section("privacy", "epsilon", run.config, math.nan))
    if _dp(run):
        out += [("epsilon spent (largest client, example-level)", number(last.get("epsilon"))),
                ("epsilon target (per client)", target),
                ("delta", number(last.get("delta"))), ("accountant", str(last.get("accountant", "")))]
    else:
        out.append(("privacy", "no DP (epsilon = inf)"))
    if "epsilon_client_level" in last:
        out.append(("central DP: epsilon (client-level)", number(last.get("epsilon_client_level"))))
    out += [("bytes up (all rounds)", _bytes(sum(number(r.get("bytes_up")) for r in rows if r.get("bytes_up")))),
            ("bytes down (all rounds)", _bytes(sum(number(r.get("bytes_down")) for r in rows if r.get("bytes_down")))),
            ("server wall time (s)", sum(number(r.get("seconds")) for r in rows if r.get("seconds") is not None)),
            ("skipped rounds", sum(1 for r in rows if r.get("skipped")))]
    if "sim_clock" in last:
        out.append(("simulated clock at the end (s)", number(last.get("sim_clock"))))
    return [{"what": k, "value": v} for k, v in out]


def _bytes(n: float) -> str:
    """``n`` bytes, exactly and in the largest binary unit that fits (``39240 (38.3 KiB)``)."""
    scale, unit = rp.byte_unit(n)
    return f"{int(n)}" if scale == 1 else f"{int(n)} ({n / scale:.1f} {unit})"


def _cell(value: Any) -> Any:
    """A metrics value for a table: JSON's "inf" / "nan" strings as floats, everything else as it is."""
    return number(value) if value in ("inf", "-inf", "nan") else value


def _round_table(run: RunFiles, names: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and columns of the every-round table."""
    cols = ["round", *names, "train_loss", "epsilon", "clients_accepted", "clients_sent", "bytes_up",
            "bytes_down", "seconds", "skipped"]
    if any("sim_seconds" in r for r in run.rows):
        cols.insert(cols.index("seconds"), "sim_seconds")
    return [{c: _cell(r.get(c)) for c in cols} for r in run.rows], cols


def _ledger_table(run: RunFiles) -> list[dict[str, Any]]:
    out = []
    for client, raw in sorted(run.ledgers.items(), key=lambda kv: (len(kv[0]), kv[0])):
        entries = [e for e in raw.get("entries", []) if isinstance(e, dict)]
        last = entries[-1] if entries else {}
        out.append({"client": client, "target_epsilon": raw.get("target_epsilon"),
                    "epsilon_spent": last.get("epsilon_after"), "delta": raw.get("delta"),
                    "accountant": raw.get("accountant", ""), "relation": raw.get("relation", ""),
                    "rounds": len({e.get("round") for e in entries}), "steps": sum(int(e.get("steps", 0))
                                                                                   for e in entries),
                    "noise_multiplier": last.get("noise_multiplier"), "sample_rate": last.get("sample_rate")})
    return out


def _header(run: RunFiles) -> str:
    c = run.config
    method = _section("adapter", "method", c, run.rows[-1].get("method", "?"))
    eps = _section("privacy", "epsilon", c, math.inf)
    dp = (f"DP-SGD, target epsilon {eps:g} per client (example-level), delta {_section('privacy', 'delta', c, '?')}, "
          f"accountant {_section('privacy', 'accountant', c, '?')}" if isinstance(eps, float) and math.isfinite(eps)
          else "no DP")
    facts = [("task type", c.get("task_type", "?")), ("model", _section("model", "path", c, "") or "(default)"),
             ("method", f"{method} rank {_section('adapter', 'rank', c, '?')}"),
             ("strategy", _section("strategy", "name", c, "fedavg")),
             ("clients", _section("train", "clients", c, "?")), ("privacy", dp),
             ("central DP", _section("central", "mode", c, "off"))]
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts)
    return (f"<section id='run'><p class='note'>Run directory <code>{html.escape(str(run.path.resolve()))}</code>; "
            f"report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from its files alone "
            f"(<code>fedpeft report RUN_DIR</code> writes it again).</p><ul>{items}</ul></section>")


def _figures_html(paths: list[Path], captions: dict[str, str]) -> str:
    return "".join(html_figure(p, captions.get(p.stem, p.stem)) for p in paths)


def write_report(path: Path) -> Path:
    """Draw the PNGs and write ``report.html`` into the run directory at ``path``; return its path."""
    run = read_run(path)
    names, higher = _metrics(run)
    plots = {p.stem: p for p in _draw(run, names[0])}
    captions = {"metrics_per_round": f"test {names[0]} and loss after each round",
                "epsilon_per_client": "example-level epsilon each client has spent, against its target (dashed)",
                "bytes_per_round": "payload bytes per round, all clients",
                "client_timeline": "simulated per-client timeline (heterogeneous devices)"}
    body = [_header(run), "<section id='summary'><h2>Summary</h2>",
            html_table(_summary(run, names, higher), ("what", "value")), "</section>",
            "<section id='metrics'><h2>Metrics per round</h2>", _figures_html([plots["metrics_per_round"]], captions),
            "</section><section id='privacy'><h2>Privacy</h2>"]
    if "epsilon_per_client" in plots:
        body.append(_figures_html([plots["epsilon_per_client"]], captions))
        if run.ledgers:
            body += ["<h3>Client ledgers</h3>", html_table(_ledger_table(run), list(_ledger_table(run)[0]))]
        else:
            body.append("<p class='note'>No client ledgers in this run directory (a deployment keeps them on "
                        "the nodes): targets are the configured one.</p>")
    else:
        body.append("<p>No DP in this run: nothing is accounted and epsilon is infinite.</p>")
    body += ["</section><section id='bytes'><h2>Bytes per round</h2>",
             _figures_html([plots["bytes_per_round"]], captions), "</section>"]
    if "client_timeline" in plots:
        others = sorted(p for p in (run.path / PLOTS_DIR).glob("*.png") if p.stem not in REPORT_PLOTS)
        counts = [{"round": r["round"], **r["hetero"]} for r in run.rows if isinstance(r.get("hetero"), dict)]
        body += ["<section id='timeline'><h2>Heterogeneous devices</h2>",
                 _figures_html([plots["client_timeline"], *others], captions)]
        if counts:
            body.append(html_table(counts, list(counts[0])))
        body.append("</section>")
    table, cols = _round_table(run, names)
    body += ["<section id='rounds'><h2>Every round</h2>", html_table(table, cols), "</section>"]
    if run.samples:
        shown = run.samples[:MAX_SAMPLES]
        body += [f"<section id='samples'><h2>Sample answers ({html.escape(run.samples_file)})</h2>",
                 html_table(shown, [k for k in ("task", "prompt", "reference", "generated") if k in shown[0]]),
                 "</section>"]
    if run.notes:
        body.append("<section id='notes'><h2>Notes</h2><ul>"
                    + "".join(f"<li>{html.escape(n)}</li>" for n in run.notes) + "</ul></section>")
    out = run.path / REPORT_FILE
    out.write_text(html_page(f"fedpeft run {run.path.resolve().name}", "".join(body)), encoding="utf-8")
    return out


def write_report_safely(path: Path) -> Path | None:
    """:func:`write_report`, logging one line instead of raising: a report must never fail a run."""
    t0 = time.perf_counter()
    try:
        out = write_report(path)
    except Exception as exc:  # noqa: BLE001 -- plotting must never hide the run's own result or error
        log.warning("report not written (%s: %s); the run directory is complete without it", type(exc).__name__, exc)
        return None
    log.info("report: %s (%.1f s)", out, time.perf_counter() - t0)
    return out
