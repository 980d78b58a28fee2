"""Scale of the heterogeneous emulation: 10 -> 100 -> 1,000 virtual clients, 10 per round.

Runs the shipped ``hetero-scale`` scenario through the real Flower simulation with
``train.clients`` set to each size (the tiny random BERT of the tests unless ``--model``),
samples the resident memory of the whole process tree (driver + Ray workers) every 0.2 s,
and writes ``benchmarks/results/hetero_scale.json``: peak RSS and mean real / simulated
seconds per round for every size. Memory should stay flat: a round touches 13 clients
(10 x 1.3 over-selection) whatever the population; what grows with N is the per-round plan
(one profile index per client, ~4 bytes each) and Flower's node registry.

    python benchmarks/hetero_scale.py [--model DIR] [--rounds 3] [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


class PeakRss:
    """Peak summed RSS of this process and all its descendants (sampled)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.period)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: the tests' tiny random BERT)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hetero_scale.json"))
    args = ap.parse_args()
    os.environ.setdefault("FEDPEFT_PROGRESS", "0")
    sys.path.insert(0, str(ROOT / "tests"))
    from fedpeft.load import parse_config
    from fedpeft.sim.hetero.run import run_scenario
    from fedpeft.sim.hetero.scenario import load_scenario

    tmp = Path(tempfile.mkdtemp(prefix="hetero-scale-"))
    model = args.model
    if not model:
        from tiny_model import make_tiny_model

        model = str(make_tiny_model(tmp / "tiny"))
    scenario = load_scenario("hetero-scale")
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        cfg = parse_config(scenario.config, {"model.path": model, "model.max_length": 24, "train.clients": n,
                                             "train.rounds": args.rounds, "data.examples_per_client": 8,
                                             "data.test_size": 64})
        t0 = time.perf_counter()
        with PeakRss() as mem:
            _, rows = run_scenario(scenario, cfg, tmp / f"run-{n}")
        results.append({
            "clients": n, "per_round": cfg.train.clients_per_round, "rounds": len(rows),
            "peak_rss_mb": round(mem.peak / 1e6, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "real_s_per_round": round(sum(r["seconds"] for r in rows) / len(rows), 2),
            "sim_s_per_round": round(sum(r["sim_seconds"] for r in rows) / len(rows), 2),
            "accepted_per_round": [r["hetero"]["accepted"] for r in rows],
        })
        print(json.dumps(results[-1]), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "host": f"{psutil.cpu_count()} CPU cores, no GPU",
           "model": "tiny random BERT (tests/tiny_model.py)" if not args.model else args.model, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
