"""What ``fedpeft simulate`` prints: a header, a progress bar per round, a line per round, a table.

Default: one header (what runs, the privacy unit, the run directory), while a round runs a
progress bar on stderr (tqdm; only on a terminal, and not with ``FEDPEFT_PROGRESS=0``), one
summary line per finished round and a final table on stdout, then the result line. ``-q``:
the result line only. ``-v``: the same plus the runtime's own log (Flower, Ray) on stderr.
Everything the runtime prints goes to the run directory's ``flower.log`` otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig

__all__ = ["Console", "quiet_libraries", "result_line"]


def quiet_libraries(verbose: bool) -> None:
    """Library loggers that print on import or at INFO (matplotlib's font cache, Flower's
    state migrations, Ray): warnings only when verbose, errors only otherwise."""
    level = logging.WARNING if verbose else logging.ERROR
    for name in ("matplotlib", "flwr", "ray", "alembic", "filelock", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(level)


def _privacy(cfg: RunConfig) -> str:
    p = cfg.privacy
    if not p.enabled:
        return "no DP"
    return (f"DP-SGD, example-level, per client: epsilon={p.epsilon:g} delta={p.delta:g} clip={p.clip:g} "
            f"({p.accountant}, replace-one neighbours)")


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _eps(row: dict[str, Any]) -> str:
    e = row.get("epsilon")
    if isinstance(e, (int, float)) and math.isfinite(e):
        return f"{e:.3f}"
    return "-"


def result_line(cfg: RunConfig, path: Path, rows: list[dict[str, Any]], metric: str) -> str:
    last = rows[-1]
    eps = (f"epsilon={last['epsilon']:.3f} ({last['epsilon_unit']}, {last.get('epsilon_relation', '?')} neighbours, "
           f"delta={last['delta']:g}, {last['accountant']}; check: fedpeft privacy audit {path})"
           if cfg.privacy.enabled else "no DP")
    return f"fedpeft: {len(rows)} rounds done: {metric}={last[metric]:.4f} {eps}; run directory: {path}"


class Console:
    """A :class:`fedpeft.sim.simulate.Progress` for a terminal (module doc)."""

    def __init__(self, metrics: tuple[str, ...], quiet: bool = False, out: Any = None) -> None:
        self.metrics = metrics
        self.quiet = quiet
        self.out = out if out is not None else sys.stdout
        self.rows: list[dict[str, Any]] = []
        self.rounds = 0
        self._bar: Any = None
        self._bar_key: tuple[int, int] | None = None

    # -- Progress ---------------------------------------------------------------------------
    def started(self, cfg: RunConfig, run_dir: Path, runtime: str) -> None:
        self.rounds = cfg.train.rounds
        if self.quiet:
            return
        model = Path(cfg.model.path).name if cfg.model.path else "default model"
        per_round = cfg.train.clients_per_round or cfg.train.clients
        self._print(f"fedpeft simulate: {cfg.adapter.method} r={cfg.adapter.rank} on {model} ({cfg.task_type}), "
                    f"{cfg.train.clients} clients ({per_round} per round), {cfg.train.rounds} rounds; "
                    f"privacy: {_privacy(cfg)}; runtime: {runtime}; run directory: {run_dir}")

    def update(self, server_round: int, attempt: int, replies: int, sent: int) -> None:
        if self.quiet or os.environ.get("FEDPEFT_PROGRESS", "1") == "0":
            return
        if self._bar_key != (server_round, attempt):
            self._close_bar()
            from tqdm import tqdm

            retry = f" (retry {attempt})" if attempt else ""
            self._bar = tqdm(total=sent, desc=f"round {server_round}/{self.rounds}{retry}", unit="client",
                             file=sys.stderr, leave=False, disable=None, dynamic_ncols=True)
            self._bar_key = (server_round, attempt)
        if self._bar is not None:
            self._bar.total = sent
            self._bar.n = replies
            self._bar.refresh()

    def round_done(self, row: dict[str, Any]) -> None:
        self._close_bar()
        self.rows.append(row)
        if self.quiet:
            return
        metrics = " ".join(f"{m}={row[m]:.4f}" for m in self.metrics if isinstance(row.get(m), (int, float)))
        skipped = " SKIPPED (too few valid replies)" if row.get("skipped") else ""
        self._print(f"round {row['round']}/{self.rounds}: {metrics} epsilon={_eps(row)} "
                    f"clients={row.get('clients_accepted', '?')}/{row.get('clients_sent', '?')} "
                    f"up={_bytes(row.get('bytes_up', 0))} {row.get('seconds', 0.0):.1f}s{skipped}")

    # -- end --------------------------------------------------------------------------------
    def table(self, rows: list[dict[str, Any]]) -> None:
        """The run's rounds as a table (all rows: a resumed run's earlier rounds too)."""
        self._close_bar()
        if self.quiet or not rows:
            return
        cols = ["round", *self.metrics, "epsilon", "clients", "bytes_up", "seconds"]
        cells = [[str(r["round"]), *(f"{r[m]:.4f}" if isinstance(r.get(m), (int, float)) else "-"
                                     for m in self.metrics),
                  _eps(r), f"{r.get('clients_accepted', '?')}/{r.get('clients_sent', '?')}",
                  _bytes(r.get("bytes_up", 0)), f"{r.get('seconds', 0.0):.1f}"] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        self._print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for row in cells:
            self._print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
