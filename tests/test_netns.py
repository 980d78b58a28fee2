"""Network-namespace plumbing for local deployment rehearsals (src/fedpeft/deploy/netns.py).

Fast (a second or two): namespaces, veth pairs and plain Python sockets, no Flower. The
namespace tests need root and a working ``ip netns``; elsewhere they are skipped with the
reason, and only the loopback and argument checks run.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from fedpeft.deploy.netns import LINK, NETNS_DIR, Loopback, NetnsError, NetnsLab, make_network, netns_unavailable

WHY_NOT = netns_unavailable()
needs_netns = pytest.mark.skipif(bool(WHY_NOT), reason=f"network namespaces unavailable: {WHY_NOT}")

SERVER = "import socket\ns = socket.create_server(('0.0.0.0', 9555))\nwhile True:\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()"


def _namespaces() -> set[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()}


def test_loopback_is_the_identity_and_names_why() -> None:
    net = Loopback(reason="not running as root")
    assert net.exec_argv("n1", ["a", "b"]) == ["a", "b"] and net.superlink_host("n1") == "127.0.0.1"
    assert "loopback" in net.describe() and "not running as root" in net.describe()
    assert make_network(["n1"], "loopback").mode == "loopback"
    with pytest.raises(NetnsError, match="invalid network"):
        make_network(["n1"], "wifi")


def test_bad_peer_names_are_refused_before_anything_is_made() -> None:
    for peers in ([], ["n1", "n1"], [LINK], ["way-too-long"]):
        with pytest.raises(NetnsError):
            NetnsLab.create(peers)


@needs_netns
def test_peers_reach_only_their_superlink_address_and_nothing_is_left_behind() -> None:
    before = _namespaces()
    lab = NetnsLab.create(["n1", "n2"])
    try:
        assert {lab.link_ns, lab.namespace("n1"), lab.namespace("n2")} <= _namespaces()
        server = subprocess.Popen(lab.exec_argv(LINK, [sys.executable, "-c", SERVER]), start_new_session=True)
        try:
            # `ip netns exec` execs the command: the PID we hold is the server, in the link namespace
            for _ in range(50):
                got = lab.probe("n1", lab.superlink_host("n1"), 9555, b"?", timeout=2)
                if got.connected:
                    break
                time.sleep(0.1)
            assert got.connected and got.answer == b"hi"
            assert _cmdline(server.pid).startswith(sys.executable)
            assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == os.stat(f"{NETNS_DIR}/{lab.link_ns}").st_ino
            assert lab.pids(LINK) == [server.pid]
            assert lab.probe(LINK, "127.0.0.1", 9555, b"?").answer == b"hi"  # the link's own loopback
            for host in (lab.superlink_host("n2"), lab.peers["n2"].peer_ip, "192.0.2.1"):
                got = lab.probe("n1", host, 9555, timeout=2)
                assert not got.connected and got.errno == errno.ENETUNREACH, (host, got)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
    finally:
        assert lab.destroy() == []
    assert _namespaces() == before and lab.destroy() == []  # idempotent


@needs_netns
def test_destroy_kills_processes_left_in_a_namespace() -> None:
    lab = NetnsLab.create(["n1"])
    proc = subprocess.Popen(lab.exec_argv("n1", ["sleep", "300"]), start_new_session=True)
    try:
        for _ in range(50):
            if lab.pids("n1"):
                break
            time.sleep(0.1)
        problems = lab.destroy()
        assert len(problems) == 1 and str(proc.pid) in problems[0] and "killed" in problems[0]
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert lab.namespace("n1") not in _namespaces()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        lab.destroy()


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode()
