"""``fedpeft simulate``'s two runtimes on the same work: the supported one against the deprecated one.

``superlink`` (the default since issue 19): ``flwr run`` on a private local SuperLink, the
ServerApp and Ray clients in Flower's ``flwr-simulation`` process (:mod:`fedpeft.sim.superlink`).
``inprocess``: the ServerApp in this process through Flower 1.42's deprecated
``flwr.simulation.run_simulation``. Both run the same configuration (the tests' tiny random
BERT, 3 clients, DP at epsilon 6) one after the other in this one invocation, interleaved
(inprocess, superlink, inprocess, ...), so the machine load is comparable. Reported per
runtime: the wall time of ``simulate()`` end to end (start-up, every round, shut-down), the
rounds' own ``seconds`` (``metrics.jsonl``), and the ratios superlink / inprocess.

Run: ``python -m benchmarks.runtime_overhead`` (from the repository root); writes
``benchmarks/results/runtime_overhead.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "runtime_overhead.json"


def _one(runtime: str, model: Path, out: Path, rounds: int) -> dict[str, Any]:
    from fedpeft.load import parse_config
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({"model.path": str(model), "model.max_length": 24, "data.examples_per_client": 96,
                        "data.test_size": 64, "train.rounds": rounds, "train.batch_size": 32,
                        "train.local_steps": 2})
    t0 = time.perf_counter()
    _, rows = simulate(cfg, out, runtime=runtime)
    total = time.perf_counter() - t0
    return {"runtime": runtime, "total_s": round(total, 2), "round_s": [round(r["seconds"], 2) for r in rows],
            "accuracy": rows[-1]["accuracy"], "epsilon": rows[-1]["epsilon"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="pairs of runs (inprocess, superlink)")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import make_tiny_model

    from benchmarks.results import hardware, load_average

    load_before = load_average()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-runtime-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny")
        for i in range(args.repeat):
            for runtime in ("inprocess", "superlink"):
                runs.append(_one(runtime, model, root / f"{runtime}-{i}", args.rounds))
                print(json.dumps(runs[-1]), flush=True)

    def med(runtime: str, key: str) -> float:
        vals = [r[key] if key == "total_s" else sum(r["round_s"]) for r in runs if r["runtime"] == runtime]
        return statistics.median(vals)

    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "work": {"model": "tiny random BERT (tests/tiny_model.py)", "clients": 3, "rounds": args.rounds,
                 "local_steps": 2, "batch_size": 32, "examples_per_client": 96, "epsilon": 6.0},
        "runs": runs,
        "ratio_total_superlink_over_inprocess": round(med("superlink", "total_s") / med("inprocess", "total_s"), 3),
        "ratio_rounds_superlink_over_inprocess": round(med("superlink", "rounds") / med("inprocess", "rounds"), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("ratio_total_superlink_over_inprocess",
                                             "ratio_rounds_superlink_over_inprocess", "load_average_before")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
