"""Real deployment: a ``flower-superlink`` and three ``flower-supernode`` processes with TLS
and SuperNode authentication on, started from the same argument lists that
``fedpeft deploy print-commands`` prints (:mod:`fedpeft.deploy.commands`).

Network: as root (and where ``ip netns`` works) every "host" is its own Linux network
namespace (:mod:`fedpeft.deploy.netns`): the SuperLink and the ``flwr`` CLI in one,
SuperNode *i* in ``n<i>`` joined to the SuperLink's namespace by a veth pair on its own
/30 subnet, and an outsider namespace ``x`` for the refused clients; no namespace has a
default route. Otherwise everything runs on loopback (127.0.0.1). Each test prints
``network: ...`` and the fixture writes the same line to ``network_mode.txt`` in its
directory. ``FEDPEFT_TEST_NETWORK=loopback|netns`` forces one (``netns`` fails if
unavailable). Traffic goes only to loopback or the test's own namespaces.

Every process is started in its own session (process group) and stopped by the fixture's
finalizer by PID -- SIGTERM to the group, then SIGKILL -- also when a test fails; the
finalizer then deletes the namespaces and checks that no started process group and no
namespace of this test is left.

Checks: the processes are the real Flower processes in their namespaces and a node's
namespace reaches nothing but its SuperLink address; an unregistered key and a client
without TLS are refused; a 3-round FFA-LoRA + DP-SGD run on the tiny model where every node
holds its own CSV file (string labels), node 3 is killed after round 1 and restarted, rejoins
for round 3 and its on-disk ledger continues; the run's metrics.jsonl (including which node
failed in round 2) and every node's ledger agree. Slow (minutes on 2 shared cores).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedpeft.deploy.commands import TUNED_ENV, NodeSpec, flwr_run_argv
from fedpeft.deploy.keys import make_keys
from fedpeft.deploy.local import BIN, Cluster, free_port, node_host, start_cluster, wait_for
from fedpeft.deploy.netns import LINK, NETNS_DIR, NetnsLab, make_network

pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.guarantee]

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fedpeft-test"
OUTSIDER = "x"  # a host that is not part of the federation (rogue and plaintext clients)


def _write_data(root: Path) -> Path:
    """Each node its own CSV (string labels fresh/rotten, its own column names) and the
    server its held-out file; nodes map their labels with the list the server sends."""
    from fedpeft.data.sources import rotten_tomatoes_path

    frame = pd.read_csv(rotten_tomatoes_path()).sample(frac=1.0, random_state=0)
    frame = frame.rename(columns={"text": "review", "category": "sentiment"})[["review", "sentiment"]]
    two = frame[frame["sentiment"].isin(["fresh", "rotten"])]
    for i in range(3):
        two.iloc[i * 48:(i + 1) * 48].to_csv(root / f"node-{i + 1}.csv", index=False)
    two.iloc[200:290].to_csv(root / "server.csv", index=False)
    return root / "server.csv"


def _netns_names() -> set[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("deploy")
    _write_data(root)
    make_keys(root / "rogue", 1)
    nodes = [NodeSpec(index=i, client_id=f"node-{i}", data_path=str(root / f"node-{i}.csv"), text_column="review",
                      label_column="sentiment", ledger_dir=str(root / f"ledger-{i}")) for i in (1, 2, 3)]
    net = make_network([node_host(n) for n in nodes] + [OUTSIDER], os.environ.get("FEDPEFT_TEST_NETWORK", "auto"))
    (root / "network_mode.txt").write_text(net.describe() + "\n")
    print(f"network: {net.describe()}")
    c = start_cluster(root, nodes, CONNECTION, net=net, env=TUNED_ENV)  # destroys `net` itself if it fails
    try:
        yield c
    finally:
        problems = c.stop()
        alive = c.procs.alive()
        left = {n for n in _netns_names() if isinstance(net, NetnsLab) and n.startswith(net.prefix)}
        assert not problems and not alive and not left, f"left behind: {problems} {alive} {sorted(left)}"


def test_processes_are_flowers_own_and_nodes_reach_only_the_superlink(cluster: Cluster) -> None:
    print(f"network: {cluster.net.describe()}")
    for name, where in [("superlink", LINK), *((n.client_id, node_host(n)) for n in cluster.nodes)]:
        proc = cluster.procs.running[name]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        exe = "flower-superlink" if name == "superlink" else "flower-supernode"
        assert any(part.endswith(exe.encode()) for part in cmdline[:2]), cmdline  # exec'd: not `ip`
        assert os.getpgid(proc.pid) == proc.pid  # its own process group: stoppable by PID
        if isinstance(cluster.net, NetnsLab):
            ns_inode = os.stat(f"{NETNS_DIR}/{cluster.net.namespace(where)}").st_ino
            assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns_inode
    if not isinstance(cluster.net, NetnsLab):
        pytest.skip(f"isolation checks need network namespaces ({cluster.net.describe()})")
    lab = cluster.net
    assert lab.probe("n1", lab.superlink_host("n1"), cluster.port).connected
    for host in (lab.superlink_host("n2"), lab.peers["n2"].peer_ip, "192.0.2.1"):  # another pair; outside
        got = lab.probe("n1", host, cluster.port, timeout=3)
        assert not got.connected and got.errno == errno.ENETUNREACH, got  # no route at all


def test_unregistered_key_and_plaintext_client_are_refused(cluster: Cluster) -> None:
    print(f"network: {cluster.net.describe()}")
    before = cluster.node_status()
    assert list(before.values()).count("online") == 3
    rogue = NodeSpec(index=9, client_id="rogue", data_path=str(cluster.root / "node-1.csv"),
                     private_key=str(cluster.root / "rogue/node-1.key"), runtime_port=free_port())
    proc = cluster.start("rogue", OUTSIDER, [*cluster.node_argv(rogue, OUTSIDER), "--max-retries", "1"])
    assert proc.wait(timeout=180) != 0
    assert "No SuperNode found with the given public key" in cluster.procs.log("superlink")
    plain = NodeSpec(index=8, client_id="plain", data_path=str(cluster.root / "node-1.csv"), runtime_port=free_port())
    proc = cluster.start("plain", OUTSIDER, [*cluster.node_argv(plain, OUTSIDER, insecure=True),
                                             "--max-retries", "1"])
    assert proc.wait(timeout=180) != 0
    # and a raw plaintext HTTP request on the SuperLink's port connects but gets no HTTP answer
    got = cluster.net.probe(OUTSIDER, cluster.net.superlink_host(OUTSIDER), cluster.port,
                            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    assert got.connected and not got.answer.startswith(b"HTTP/"), got
    cluster.procs.stop("rogue")
    cluster.procs.stop("plain")
    assert cluster.node_status() == before  # nobody new joined


def _ledger(cluster: Cluster, i: int) -> dict[str, Any]:
    return json.loads((cluster.root / f"ledger-{i}" / f"client-node-{i}.json").read_text())


@pytest.mark.timeout(2400)
def test_three_rounds_with_dp_and_a_supernode_killed_and_restarted(cluster: Cluster, tiny_model_dir: Path) -> None:
    print(f"network: {cluster.net.describe()}")
    run_dir = cluster.root / "run"
    run_config = " ".join([
        f"model.path='{tiny_model_dir}'", "model.max_length=24",
        f"data.path='{cluster.root / 'server.csv'}'", "data.text_column='review'", "data.label_column='sentiment'",
        "data.test_size=30", "train.rounds=3", "train.batch_size=16", "train.local_steps=2",
        "adapter.method='ffa_lora'", "privacy.epsilon=6.0", f"output_dir='{run_dir}'",
    ])
    run = cluster.start("flwr-run", LINK, flwr_run_argv(CONNECTION, run_config, app_dir=str(REPO),
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
    assert got[1]["clients_accepted"] == 2  # node 3 was down during round 2 ...
    assert set(got[1]["failed"]) == {f"node-{node3_id}"}  # ... and the server names node 3, not the SuperLink
    assert not got[0]["failed"] and not got[2]["failed"]
    assert cluster.node_id("node-3") == node3_id  # rejoined under its registered identity
    for r in got:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accountant"] == "pld" and r["epsilon_unit"].startswith("example")
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
