"""Resource hygiene: memory must not grow round over round in a long simulation.

Runs a real Flower simulation of ``--rounds`` (default 50) rounds and, after each round,
records the resident memory of the whole process tree (server/driver + Ray workers) from
a round hook. Writes ``benchmarks/results/memory_rounds.json`` with the per-round series,
the least-squares slope over the second half of the run (MB per round, after warm-up:
allocator pools and Ray's object store settle in the first rounds) and whether the target
holds: the memory at the last round is within 5 % of the memory at the first round of the
second half, and the slope extrapolated over 1,000 rounds stays below 10 % of that
memory. Uses the tests' tiny random BERT unless ``--model`` names a model directory.

    python benchmarks/memory_rounds.py [--rounds 50] [--model DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedpeft.server.loop import RoundHook

ROOT = Path(__file__).resolve().parents[1]


def tree_rss_by_kind() -> dict[str, int]:
    """RSS of this process and all its descendants, summed per kind of process.

    The kind is the process title (``ray::ClientAppActor``, ``gcs_server``, ``raylet``, ...)
    or, for Python processes, the script they run; this process is ``driver``. It tells
    whether growth is ours (driver = ServerApp, actors = ClientApps) or Ray's bookkeeping.
    """
    me = psutil.Process()
    kinds: dict[str, int] = {}
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
            if p.pid == me.pid:
                kind = "driver"
            else:
                cmd = p.cmdline()
                script = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), "")
                kind = script or (Path(cmd[0]).name if cmd else p.name())
            kinds[kind] = kinds.get(kind, 0) + p.memory_info().rss
    return kinds


def tree_rss() -> int:
    """Summed RSS of this process and all its descendants (Ray's workers included)."""
    return sum(tree_rss_by_kind().values())


class RssPerRound(RoundHook):
    """Round hook: process-tree RSS after every round."""

    def __init__(self) -> None:
        self.mb: list[float] = []
        self.by_kind: list[dict[str, float]] = []

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        kinds = tree_rss_by_kind()
        self.by_kind.append({k: round(v / 1e6, 1) for k, v in sorted(kinds.items())})
        self.mb.append(sum(kinds.values()) / 1e6)
        row["tree_rss_mb"] = round(self.mb[-1], 1)


def _growth_by_kind(by_kind: list[dict[str, float]]) -> dict[str, float]:
    """MB each kind of process gained from the middle of the run to the end."""
    if not by_kind:
        return {}
    mid, last = by_kind[len(by_kind) // 2], by_kind[-1]
    return {k: round(last.get(k, 0.0) - mid.get(k, 0.0), 1) for k in sorted(set(mid) | set(last))}


def verdict(mb: list[float]) -> dict[str, Any]:
    """Slope and growth over the second half of the series, and whether the target is met."""
    half = mb[len(mb) // 2:]
    slope = float(np.polyfit(np.arange(len(half)), np.asarray(half), 1)[0]) if len(half) >= 2 else 0.0
    growth = half[-1] / half[0] if half and half[0] > 0 else float("nan")
    met = bool(growth <= 1.05 and slope * 1000 <= 0.10 * half[0])
    return {"second_half_start_mb": round(half[0], 1), "last_mb": round(half[-1], 1),
            "growth_second_half": round(growth, 4), "slope_mb_per_round": round(slope, 3),
            "target": "last <= 1.05 x mid-run and slope x 1000 rounds <= 10 % of mid-run memory", "met": met}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: the tests' tiny random BERT)")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_rounds.json"))
    args = ap.parse_args()
    os.environ.setdefault("FEDPEFT_PROGRESS", "0")
    sys.path.insert(0, str(ROOT / "tests"))
    from fedpeft.load import parse_config
    from fedpeft.sim.simulate import simulate

    tmp = Path(tempfile.mkdtemp(prefix="memory-rounds-"))
    model = args.model
    if not model:
        from tiny_model import make_tiny_model

        model = str(make_tiny_model(tmp / "tiny"))
    cfg = parse_config({"model.path": model, "model.max_length": 24, "train.rounds": args.rounds,
                        "data.examples_per_client": 64, "data.test_size": 64, "train.batch_size": 32,
                        "train.local_steps": 1, "privacy.epsilon": 6.0})
    hook = RssPerRound()
    t0 = time.perf_counter()
    _, rows = simulate(cfg, tmp / "run", hooks=[hook])
    out = {
        "date": time.strftime("%Y-%m-%d"), "host": f"{psutil.cpu_count()} CPU cores, no GPU",
        "model": "tiny random BERT (tests/tiny_model.py)" if not args.model else args.model,
        "rounds": len(rows), "clients": cfg.train.clients, "dp": "DP-SGD epsilon=6 (ledger, accountant every round)",
        "wall_s": round(time.perf_counter() - t0, 1), "rss_mb_per_round": [round(x, 1) for x in hook.mb],
        **verdict(hook.mb),
        "growth_by_kind_mb": _growth_by_kind(hook.by_kind),
        "rss_mb_by_kind_per_round": hook.by_kind,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in out.items() if k != "rss_mb_per_round"}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
