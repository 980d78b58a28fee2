"""Follow a run from its directory: the round in flight and each finished round.

The server loop writes ``progress.json`` (replies received of instructions sent, while a
round runs) and appends one ``metrics.jsonl`` row per finished round
(:class:`fedpeft.server.run_dir.RunDir`). :class:`RunWatcher` reads both -- from whichever
process the server runs in -- and tells a :class:`~fedpeft.sim.simulate.Progress` of each
change; optionally it copies new lines of the runtime's log file to stderr (``--verbose``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunWatcher"]


class RunWatcher:
    """Polls ``run_dir``; a no-op when ``progress`` is None and nothing is tailed."""

    def __init__(self, run_dir: Path, progress: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._seen_round = self._last_round()  # a resumed run's checkpointed rounds are not news
        self._last_progress = ""
        self._tail: Path | None = None
        self._tail_pos = 0

    def _last_round(self) -> int:
        rows = self._rows()
        return max((int(r.get("round", 0)) for r in rows), default=0)

    def _rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            with contextlib.suppress(ValueError):  # a line being written
                rows.append(json.loads(line))
        return rows

    def tail(self, log_path: Path | None) -> None:
        """Copy lines appended to ``log_path`` to stderr on every :meth:`poll` (None: stop)."""
        self._tail = log_path
        self._tail_pos = log_path.stat().st_size if log_path is not None and log_path.is_file() else 0

    def poll(self) -> None:
        self._copy_tail()
        if self.progress is None:
            return
        try:
            raw = (self.run_dir / "progress.json").read_text(encoding="utf-8")
        except OSError:
            raw = ""
        if raw and raw != self._last_progress:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                p = json.loads(raw)
                if int(p["round"]) > self._seen_round:
                    self.progress.update(int(p["round"]), int(p["attempt"]), int(p["replies"]), int(p["sent"]))
                self._last_progress = raw
        for row in self._rows():
            if int(row.get("round", 0)) > self._seen_round:
                self._seen_round = int(row["round"])
                self.progress.round_done(row)

    def _copy_tail(self) -> None:
        if self._tail is None or not self._tail.is_file():
            return
        with self._tail.open("rb") as fh:
            fh.seek(self._tail_pos)
            chunk = fh.read()
        self._tail_pos += len(chunk)
        if chunk:
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    @contextlib.contextmanager
    def background(self, interval: float = 0.5) -> Iterator[None]:
        """:meth:`poll` every ``interval`` seconds in a thread while inside (the in-process runtime)."""
        if self.progress is None and self._tail is None:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                self.poll()

        thread = threading.Thread(target=loop, name="fedpeft-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.poll()
