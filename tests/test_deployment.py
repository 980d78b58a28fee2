"""Real deployment: a ``flower-superlink`` and three ``flower-supernode`` processes with TLS
and SuperNode authentication on, started from the same argument lists that
``fedpeft deploy print-commands`` prints (:mod:`simulations.deploy.commands`).

Network: loopback (127.0.0.1); every process binds or dials 127.0.0.1 only. Each test
prints ``network: loopback`` and the cluster writes it to ``network_mode.txt``. (Separate
network namespaces with veth pairs are not implemented yet.)

Every process is started in its own session (process group) and stopped by the fixture's
finalizer by PID -- SIGTERM to the group, then SIGKILL -- also when a test fails.

Checks: an unregistered key and a client without TLS are refused; a 3-round FFA-LoRA +
DP-SGD run on the tiny model where every node holds its own CSV file (string labels), node 3 is killed after round 1 and
restarted, rejoins for round 3 and its on-disk ledger continues; the run's metrics.jsonl
and every node's ledger agree. Slow (minutes on 2 shared cores): marked ``slow``.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from simulations.deploy.commands import NodeSpec, flwr_run_argv
from simulations.deploy.keys import make_keys
from simulations.deploy.local import BIN, Cluster, free_port, start_cluster, wait_for

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NETWORK = "loopback"
CONNECTION = "fedpeft-test"


def _write_data(root: Path) -> Path:
    """Each node its own CSV (string labels fresh/rotten, its own column names) and the
    server its held-out file; nodes map their labels with the list the server sends."""
    from task.data import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path()).sample(frac=1.0, random_state=0)
    frame = frame.rename(columns={"text": "review", "category": "sentiment"})[["review", "sentiment"]]
    two = frame[frame["sentiment"].isin(["fresh", "rotten"])]
    for i in range(3):
        two.iloc[i * 48:(i + 1) * 48].to_csv(root / f"node-{i + 1}.csv", index=False)
    two.iloc[200:290].to_csv(root / "server.csv", index=False)
    return root / "server.csv"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("deploy")
    (root / "network_mode.txt").write_text(NETWORK + "\n")
    print(f"network: {NETWORK}")
    _write_data(root)
    make_keys(root / "rogue", 1)
    nodes = [NodeSpec(index=i, client_id=f"node-{i}", data_path=str(root / f"node-{i}.csv"), text_column="review",
                      label_column="sentiment", ledger_dir=str(root / f"ledger-{i}")) for i in (1, 2, 3)]
    c = start_cluster(root, nodes, CONNECTION)
    try:
        yield c
    finally:
        c.stop()


def test_unregistered_key_and_plaintext_client_are_refused(cluster: Cluster) -> None:
    print(f"network: {NETWORK}")
    before = cluster.node_status()
    rogue = NodeSpec(index=9, client_id="rogue", data_path=str(cluster.root / "node-1.csv"),
                     private_key=str(cluster.root / "rogue/node-1.key"), runtime_port=free_port())
    proc = cluster.procs.start("rogue", [*cluster.node_argv(rogue), "--max-retries", "1"], cwd=cluster.root)
    assert proc.wait(timeout=180) != 0
    assert "No SuperNode found with the given public key" in cluster.procs.log("superlink")
    plain = NodeSpec(index=8, client_id="plain", data_path=str(cluster.root / "node-1.csv"), runtime_port=free_port())
    proc = cluster.procs.start("plain", [*cluster.node_argv(plain, insecure=True), "--max-retries", "1"],
                               cwd=cluster.root)
    assert proc.wait(timeout=180) != 0
    # and a raw plaintext HTTP request on the SuperLink's port gets no HTTP answer
    host, port = cluster.superlink.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(64)
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/")
    cluster.procs.stop("rogue")
    cluster.procs.stop("plain")
    assert cluster.node_status() == before  # nobody new joined


def _ledger(cluster: Cluster, i: int) -> dict[str, Any]:
    return json.loads((cluster.root / f"ledger-{i}" / f"client-node-{i}.json").read_text())


@pytest.mark.timeout(2400)
def test_three_rounds_with_dp_and_a_supernode_killed_and_restarted(cluster: Cluster, tiny_model_dir: Path) -> None:
    print(f"network: {NETWORK}")
    run_dir = cluster.root / "run"
    run_config = " ".join([
        f"model.path='{tiny_model_dir}'", "model.max_length=24",
        f"data.path='{cluster.root / 'server.csv'}'", "data.text_column='review'", "data.label_column='sentiment'",
        "data.test_size=30", "train.rounds=3", "train.batch_size=16", "train.local_steps=2",
        "adapter.method='ffa_lora'", "privacy.epsilon=6.0", f"output_dir='{run_dir}'",
    ])
    run = cluster.procs.start("flwr-run", flwr_run_argv(CONNECTION, run_config, app_dir=str(REPO),
                                                        exe=str(BIN / "flwr")), cwd=REPO)
    metrics = run_dir / "metrics.jsonl"

    def rows() -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.exists() else []

    wait_for(lambda: len(rows()) >= 1 or run.poll() is not None, 900, "round 1", 2.0)
    assert rows(), cluster.procs.log("flwr-run")[-3000:]
    # Crash node 3 mid-run (SIGKILL: no clean shutdown), then restart it once the SuperLink
    # has marked it offline (so its lost round-2 message is answered with an error, not awaited).
    node3 = cluster.nodes[2]
    node3_id = cluster.node_id("node-3")
    ledger_before = _ledger(cluster, 3)
    cluster.procs.stop("node-3", sig=signal.SIGKILL)
    wait_for(lambda: cluster.node_status().get(node3_id) == "offline", 300, "node 3 offline", 5.0)
    cluster.start_node(node3)
    assert run.wait(timeout=1200) == 0, cluster.procs.log("flwr-run")[-3000:]

    got = rows()
    assert [r["round"] for r in got] == [1, 2, 3]
    assert got[0]["clients_accepted"] == 3 and got[2]["clients_accepted"] == 3
    assert got[1]["clients_accepted"] == 2  # node 3 was down during round 2
    assert cluster.node_id("node-3") == node3_id  # rejoined under its registered identity
    for r in got:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accountant"] == "prv" and r["epsilon_unit"].startswith("example")
        assert 0.0 < r["epsilon"] <= 6.0 + 1e-6
    assert set(got[-1]["epsilon_per_client"]) == {"node-1", "node-2", "node-3"}
    for i in (1, 2, 3):
        led = _ledger(cluster, i)
        rounds = [e["round"] for e in led["entries"]]
        assert rounds == ([1, 2, 3] if i != 3 else [1, 3])
        eps = [e["epsilon_after"] for e in led["entries"]]
        assert eps == sorted(eps) and eps[-1] <= 6.0 + 1e-6
        assert abs(got[-1]["epsilon_per_client"][f"node-{i}"] - eps[-1]) < 1e-9
    after = _ledger(cluster, 3)
    assert after["entries"][0] == ledger_before["entries"][0]  # the restart kept its history ...
    assert after["noise_multiplier"] == ledger_before["noise_multiplier"]  # ... and its calibration
    assert after["entries"][1]["epsilon_after"] > ledger_before["entries"][0]["epsilon_after"]
    assert all(r["method"] == "ffa_lora" for r in got)
