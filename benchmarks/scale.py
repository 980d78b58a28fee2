"""Scale in virtual clients: does a round cost more when the federation is larger?

The earlier version timed rounds of 0.2-0.3 s, which the simulation grid's 0.1 s reply poll
quantised (1.46x, 1.49x and 1.07x in three runs of the same code). This one measures, per
round, what a poll does not change, in every population size (default 10, 1,000 and 10,000
virtual clients, always 10 sampled per round, the same work per round):

* **CPU seconds per round of the ServerApp's thread** (found in this process by the frame of
  :mod:`fedpeft.server.loop` on its stack; Linux per-thread times through ``psutil``), read at
  each round's end -- a round ends when its row lands in ``metrics.jsonl``
  (:class:`RoundSampler`); sleeping in a poll costs none. This is the cost that grows with the
  population if anything does (sampling, bookkeeping, validation, checkpoints);
* CPU seconds per round of the whole process tree (driver, ServerApp, simulation workers --
  and Ray's own daemons, which spin all the time, so this figure grows with a round's wall
  time on a loaded machine);
* **wall seconds per round** (``seconds`` of ``metrics.jsonl``), with local training long
  enough (``local_steps``) that a round lasts seconds, not tenths;
* **peak RSS** of the driver process alone and of the whole tree, while the rounds ran.

Sizes are run interleaved (10, 1,000, 10,000, 10, ...) ``reps`` times; each run's value is
the median over its rounds after the first (round 1 starts the workers and calibrates);
the ratio is largest / smallest size of the medians over runs, and the spread is the range
of that ratio over the repetitions (rep *k*'s largest over rep *k*'s smallest).

The data is a synthetic CSV (Rotten Tomatoes texts, numbered so that they are distinct,
twice as many rows as 10,000 clients x 2 examples need), since the shipped file has too few
rows for 10,000 clients of at least 2 examples.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from .results import Measurement, Target

__all__ = ["RoundSampler", "scale", "synthetic_data"]

Progress = Callable[[str], None]


class RoundSampler:
    """Samples the process tree every ``period`` s; marks CPU and RSS at each new metrics row."""

    def __init__(self, metrics: Path, period: float = 0.05) -> None:
        self.metrics, self.period = metrics, period
        self.cpu_at_row: list[float] = []  # cumulative tree CPU seconds when row i appeared
        self.server_cpu_at_row: list[float | None] = []  # the ServerApp thread's CPU seconds then
        self._server_tid: int | None = None
        self.tree_peak: list[int] = []  # peak tree RSS during round i
        self.driver_peak: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._gone_cpu = 0.0  # CPU of tree members that exited
        self._seen: dict[int, float] = {}

    def _tree_cpu_rss(self) -> tuple[float, int, int]:
        me = psutil.Process()
        cpu, rss, alive = 0.0, 0, {}
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                alive[p.pid] = t.user + t.system
                rss += p.memory_info().rss
        self._gone_cpu += sum(v for pid, v in self._seen.items() if pid not in alive)
        self._seen = alive
        cpu = self._gone_cpu + sum(alive.values())
        return cpu, rss, me.memory_info().rss

    def _server_cpu(self) -> float | None:
        """CPU seconds of the thread running fedpeft's server loop in this process (None: not here)."""
        if self._server_tid is None:
            frames = sys._current_frames()
            for t in threading.enumerate():
                frame = frames.get(t.ident or -1)
                while frame is not None and "fedpeft/server/loop.py" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None:
                    self._server_tid = t.native_id
        if self._server_tid is None:
            return None
        for th in psutil.Process().threads():
            if th.id == self._server_tid:
                return float(th.user_time + th.system_time)
        return None

    def _rows(self) -> int:
        try:
            return sum(1 for ln in self.metrics.read_text().splitlines() if ln.strip())
        except OSError:
            return 0

    def _run(self) -> None:
        tree_peak = driver_peak = 0
        while not self._stop.is_set():
            cpu, rss, driver = self._tree_cpu_rss()
            server = self._server_cpu()
            tree_peak, driver_peak = max(tree_peak, rss), max(driver_peak, driver)
            while self._rows() > len(self.cpu_at_row):
                self.cpu_at_row.append(cpu)
                self.server_cpu_at_row.append(server)
                self.tree_peak.append(tree_peak)
                self.driver_peak.append(driver_peak)
                tree_peak = driver_peak = 0
            time.sleep(self.period)

    def __enter__(self) -> RoundSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_per_round(self) -> list[float]:
        """Tree CPU seconds of rounds 2, 3, ... (round 1 has no start mark)."""
        return [b - a for a, b in zip(self.cpu_at_row, self.cpu_at_row[1:], strict=False)]

    def server_cpu_per_round(self) -> list[float]:
        """The ServerApp thread's CPU seconds of rounds 2, 3, ... (empty when it ran elsewhere)."""
        marks = self.server_cpu_at_row
        return [b - a for a, b in zip(marks, marks[1:], strict=False) if a is not None and b is not None]


def synthetic_data(path: Path, rows: int) -> Path:
    """``rows`` distinct labelled texts from the Rotten Tomatoes reviews (module doc)."""
    import pandas as pd

    from fedpeft.data.sources import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path())
    frame = frame[frame["category"].isin(["fresh", "rotten"])][["text", "category"]].reset_index(drop=True)
    reps = -(-rows // len(frame))
    big = pd.concat([frame] * reps, ignore_index=True).iloc[:rows].copy()
    big["text"] = [f"{t} ({i})" for i, t in enumerate(big["text"])]
    big.to_csv(path, index=False)
    return path


def _one(model_path: str, data: Path, n: int, rounds: int, per_round: int, local_steps: int,
         run_dir: Path) -> dict[str, Any]:
    from fedpeft.load import parse_config
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({"model.path": model_path, "model.max_length": 24, "data.path": str(data),
                        "data.text_column": "text", "data.label_column": "category", "train.clients": n,
                        "train.clients_per_round": per_round, "train.rounds": rounds, "train.local_steps": local_steps,
                        "train.batch_size": 8, "data.examples_per_client": 8, "data.partition": "iid",
                        "data.test_size": 64, "output_dir": str(run_dir)})
    t0 = time.perf_counter()
    with RoundSampler(run_dir / "metrics.jsonl") as s:
        _, rows = simulate(cfg, run_dir)
    wall = [float(r["seconds"]) for r in rows]
    cpu, server = s.cpu_per_round(), s.server_cpu_per_round()
    return {"clients": n, "wall_s": round(time.perf_counter() - t0, 1), "round_s": [round(x, 2) for x in wall],
            "round_cpu_s": [round(x, 2) for x in cpu], "round_server_cpu_s": [round(x, 3) for x in server],
            "median_round_server_cpu_s": statistics.median(server) if server else float("nan"),
            "median_round_s": statistics.median(wall[1:]),
            "median_round_cpu_s": statistics.median(cpu) if cpu else float("nan"),
            "driver_peak_mb": round(max(s.driver_peak[1:] or s.driver_peak) / 1e6, 1),
            "tree_peak_mb": round(max(s.tree_peak[1:] or s.tree_peak) / 1e6, 1)}


def scale(model_path: str, sizes: tuple[int, ...], rounds: int, reps: int = 3, local_steps: int = 8,
          per_round: int = 10, progress: Progress | None = None) -> list[Measurement]:
    """Per-round CPU, wall time and memory for each size; ratios largest / smallest with spread."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    runs: list[dict[str, Any]] = []
    try:
        data = synthetic_data(tmp / "pool.csv", max(sizes) * 4 + 200)
        for rep in range(reps):
            for n in sizes:
                runs.append({"rep": rep, **_one(model_path, data, n, rounds, per_round, local_steps,
                                                tmp / f"run-{rep}-{n}")})
                shutil.rmtree(tmp / f"run-{rep}-{n}", ignore_errors=True)
                if progress:
                    r = runs[-1]
                    progress(f"rep {rep + 1}/{reps}, {n} clients: {r['median_round_s']:.2f} s/round, server "
                             f"{r['median_round_server_cpu_s']:.3f} CPU s/round, tree {r['median_round_cpu_s']:.2f} "
                             f"CPU s/round, driver {r['driver_peak_mb']:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lo, hi = min(sizes), max(sizes)
    detail = {"model": model_path, "per_round": per_round, "rounds": rounds, "reps": reps, "local_steps": local_steps,
              "runs": runs, "note": "medians over rounds after the first; sizes interleaved; spread = range over reps "
                                    "of rep k's largest / smallest"}
    name = f"{hi:,} / {lo:,} clients"
    out = []
    for key, what in (("median_round_server_cpu_s", "ServerApp CPU time per round"),
                      ("median_round_cpu_s", "CPU time per round (process tree, incl. Ray daemons)"),
                      ("median_round_s", "wall time per round"), ("driver_peak_mb", "peak driver memory"),
                      ("tree_peak_mb", "peak memory, process tree")):
        per_rep = [next(r[key] for r in runs if r["rep"] == k and r["clients"] == hi)
                   / next(r[key] for r in runs if r["rep"] == k and r["clients"] == lo) for k in range(reps)]
        ratio = (statistics.median(r[key] for r in runs if r["clients"] == hi)
                 / statistics.median(r[key] for r in runs if r["clients"] == lo))
        out.append(Measurement("scale", f"{what}, {name} (spread {min(per_rep):.2f}-{max(per_rep):.2f} over {reps} "
                                        f"reps)", ratio, "x", Target("<=", 1.2),
                               detail={**detail, "ratio_per_rep": per_rep}))
    return out
