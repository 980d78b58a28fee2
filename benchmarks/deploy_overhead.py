"""Per-round overhead of a real deployment against the simulation, for the same work.

Deployment: ``flower-superlink`` + 3 ``flower-supernode`` processes on loopback with TLS
and SuperNode authentication (:mod:`simulations.deploy.local`), each node with its own
CSV file, started with ``flwr run``. Simulation: :func:`simulations.simulate.simulate`
(Flower's simulation engine, in-process Ray) on the union of the same files with the same
examples per client, batch, local steps, rounds, model and DP settings. Both run in this
one invocation, one after the other, so the machine load is comparable; the ratio is
mean deployment round seconds / mean simulation round seconds (``seconds`` of
``metrics.jsonl``: send -> replies -> aggregate -> evaluate), also without round 1.

Flower 1.42 settings that set the pace: a SuperNode polls for messages every 3 s when idle
and heartbeats every 30 s; both are constants in Flower's code (no CLI flag or config),
so they cannot be tuned from outside; and with the default ``--isolation subprocess`` each
message starts a new ``flwr-clientapp`` process (imports torch/transformers, loads the
model) -- the per-round fixed cost this benchmark shows.

Run: ``python -m benchmarks.deploy_overhead`` (from the repository root); writes
``benchmarks/results/deploy_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "deploy_overhead.json"


def _data(root: Path, nodes: int, per_node: int) -> tuple[list[Path], Path, Path]:
    from task.data import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path()).sample(frac=1.0, random_state=0)
    frame = frame[frame["category"].isin(["fresh", "rotten"])][["text", "category"]]
    files = []
    for i in range(nodes):
        files.append(root / f"node-{i + 1}.csv")
        frame.iloc[i * per_node:(i + 1) * per_node].to_csv(files[-1], index=False)
    server = root / "server.csv"
    frame.iloc[nodes * per_node:nodes * per_node + 64].to_csv(server, index=False)
    union = root / "union.csv"  # the simulation's pool: the node files plus the server's test rows
    frame.iloc[:nodes * per_node + 64].to_csv(union, index=False)
    return files, server, union


def _settings(model: Path, rounds: int) -> dict[str, Any]:
    return {"model.path": str(model), "model.max_length": 24, "data.text_column": "text",
            "data.label_column": "category", "data.test_size": 64, "train.rounds": rounds, "train.batch_size": 16,
            "train.local_steps": 2, "privacy.epsilon": 6.0, "adapter.method": "ffa_lora"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_deployment(root: Path, model: Path, rounds: int, nodes: int, per_node: int) -> dict[str, Any]:
    from simulations.deploy.commands import NodeSpec, flwr_run_argv
    from simulations.deploy.local import BIN, start_cluster

    files, server, _ = _data(root, nodes, per_node)
    specs = [NodeSpec(index=i + 1, client_id=f"node-{i + 1}", data_path=str(f), text_column="text",
                      label_column="category", ledger_dir=str(root / f"ledger-{i + 1}")) for i, f in enumerate(files)]
    t0 = time.perf_counter()
    cluster = start_cluster(root / "cluster", specs, "fedpeft-bench")
    startup = time.perf_counter() - t0
    try:
        settings = {**_settings(model, rounds), "data.path": str(server), "train.clients": nodes,
                    "output_dir": str(root / "deploy-run")}
        run_config = " ".join(f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())
        t0 = time.perf_counter()
        proc = cluster.procs.start("flwr-run", flwr_run_argv("fedpeft-bench", run_config, app_dir=str(REPO),
                                                             exe=str(BIN / "flwr")), cwd=REPO)
        rc = proc.wait(timeout=3600)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"flwr run failed ({rc}): {cluster.procs.log('flwr-run')[-2000:]}")
    finally:
        cluster.stop()
    rows = _rows(root / "deploy-run" / "metrics.jsonl")
    return {"cluster_startup_s": startup, "flwr_run_wall_s": wall, "round_seconds": [r["seconds"] for r in rows],
            "accuracy": rows[-1]["accuracy"], "epsilon": rows[-1]["epsilon"]}


def run_simulation(root: Path, model: Path, rounds: int, nodes: int, per_node: int) -> dict[str, Any]:
    from simulations.simulate import simulate
    from task.config import parse_config

    _, _, union = _data(root, nodes, per_node)
    cfg = parse_config({**_settings(model, rounds), "data.path": str(union), "train.clients": nodes,
                        "data.examples_per_client": per_node, "data.partition": "iid"})
    t0 = time.perf_counter()
    _, rows = simulate(cfg, root / "sim-run")
    wall = time.perf_counter() - t0
    return {"simulate_wall_s": wall, "round_seconds": [r["seconds"] for r in rows],
            "accuracy": rows[-1]["accuracy"], "epsilon": rows[-1]["epsilon"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--per-node", type=int, default=48)
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import make_tiny_model

    from benchmarks.results import hardware

    with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny")
        (root / "d").mkdir()
        (root / "s").mkdir()
        deploy = run_deployment(root / "d", model, args.rounds, args.nodes, args.per_node)
        sim = run_simulation(root / "s", model, args.rounds, args.nodes, args.per_node)
    d, s = deploy["round_seconds"], sim["round_seconds"]
    result = {
        "benchmark": "deploy_overhead",
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware(),
        "network": "loopback",
        "work": {"model": "tiny random BERT (tests/tiny_model.py)", "nodes": args.nodes, "examples_per_node":
                 args.per_node, "rounds": args.rounds, "batch_size": 16, "local_steps": 2, "dp_epsilon": 6.0,
                 "method": "ffa_lora"},
        "deployment": deploy,
        "simulation": sim,
        "ratio_mean_round": statistics.mean(d) / statistics.mean(s),
        "ratio_mean_round_after_first": (statistics.mean(d[1:]) / statistics.mean(s[1:])) if len(d) > 1 else None,
        "tuning": ("Flower 1.42 hard-codes the SuperNode's idle poll (3 s) and heartbeat (30 s) intervals; no "
                   "CLI flag or config changes them, so nothing was tuned. Each round starts a new flwr-clientapp "
                   "process per node (isolation=subprocess)."),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_mean_round", "ratio_mean_round_after_first")}),
          f"deployment rounds {[round(x, 1) for x in d]} s, simulation rounds {[round(x, 1) for x in s]} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
