"""The run directory contract that other tools and tests read.

```
DIR/config.toml     fully resolved configuration
DIR/metrics.jsonl   one JSON object per round
DIR/ledger/         one privacy ledger per client (client-<id>.json)
DIR/adapter/        final global adapter, a PEFT directory
DIR/server.log      log with one summary line per round
DIR/checkpoint.npz  server state after the last completed round (src/fedpeft/server/checkpoint.py)
DIR/report.html     the run at a glance, PNGs embedded; DIR/plots/ the PNGs (src/fedpeft/server/report.py)
DIR/progress.json   the round in flight: replies received of instructions sent
```

A directory whose ledgers were charged under one configuration is never reused for
another: :meth:`RunDir.write_config` refuses (:class:`RunDirReused`) when ``ledger/``
already holds ledgers and the saved ``config.toml`` hashes differently from the new run
(a resume of the same configuration is allowed). Mixing two runs' spending in one
directory would make its ledgers, metrics and audit describe neither run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig, config_hash, config_to_toml
from fedpeft.io import atomic_write_text

__all__ = ["RunDir", "RunDirReused", "default_run_dir", "jsonable", "saved_config_hash"]


class RunDirReused(ValueError):
    """A run directory with ledgers of another configuration was given to a new run."""


def saved_config_hash(path: Path) -> str:
    """:func:`fedpeft.config.config_hash` of the ``config.toml`` at ``path``; if that no longer
    parses (an older, now invalid configuration), ``"unparseable-"`` + a hash of its text."""
    from fedpeft.load import config_from_toml  # here, not at module level: the CLI imports this
    # module at start-up for RunDirReused, and validation loads every adapter plugin

    text = path.read_text(encoding="utf-8")
    try:
        return config_hash(config_from_toml(text))
    except (ValueError, TypeError, KeyError):
        return "unparseable-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def default_run_dir(cfg: RunConfig) -> Path:
    """``cfg.output_dir`` if set, else ``runs/<name-or-timestamp>``."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class RunDir:
    """Creates and writes the files of one run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.ledger_dir.mkdir(exist_ok=True)

    @property
    def ledger_dir(self) -> Path:
        return self.path / "ledger"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: RunConfig) -> None:
        """Write ``config.toml``; RunDirReused if this directory holds ledgers of another config."""
        self.check_reuse(cfg)
        atomic_write_text(self.path / "config.toml", config_to_toml(cfg))

    def check_reuse(self, cfg: RunConfig) -> None:
        """RunDirReused (one line, both hashes) if ``ledger/client-*.json`` exist and the saved
        ``config.toml`` is of another configuration (or missing)."""
        if not any(self.ledger_dir.glob("client-*.json")):
            return
        saved_path = self.path / "config.toml"
        new = config_hash(cfg)
        saved = saved_config_hash(saved_path) if saved_path.is_file() else "missing"
        if saved != new:
            raise RunDirReused(f"{self.path} holds privacy ledgers of configuration {saved}, this run is {new}; "
                               f"use a new --output-dir (only a resume of the same configuration may reuse it)")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.npz"

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` atomically with ``rows`` (resume: exactly the checkpointed rounds)."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(row)) + "\n")

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    def write_progress(self, server_round: int, attempt: int, replies: int, sent: int) -> None:
        """The round in flight and how many of its instructions have a reply (what a progress bar
        in another process reads; overwritten as replies arrive)."""
        atomic_write_text(self.progress_path, json.dumps({"round": server_round, "attempt": attempt,
                                                          "replies": replies, "sent": sent}))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def attach_log(self, logger_names: tuple[str, ...] = ("fedpeft",)) -> logging.Handler:
        handler = logging.FileHandler(self.path / "server.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in logger_names:
            lg = logging.getLogger(name)
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
        return handler
