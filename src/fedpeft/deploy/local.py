"""A real deployment on this machine: SuperLink + N SuperNodes, TLS and node auth on.

Used by the integration tests (``tests/test_deployment.py``) and the overhead benchmark
(``benchmarks/deploy_overhead.py``). The processes are started from the same argument
lists ``fedpeft deploy print-commands`` prints (:mod:`fedpeft.deploy.commands`), each
in its own session (process group), and :meth:`Procs.stop` ends them by PID: SIGTERM to
the group, then SIGKILL.

Where they run is a :class:`~fedpeft.deploy.netns.Network`: with network namespaces
(root) the SuperLink and the ``flwr`` CLI run in the SuperLink's namespace and SuperNode
*i* in namespace ``n<i>``, dialing the SuperLink's address on its own veth pair; on
loopback everything binds or dials 127.0.0.1. Either way traffic stays on this machine,
and ``FLWR_HOME`` is a private directory, so the user's ``~/.flwr`` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.commands import NodeSpec, connection_toml, register_argv, superlink_argv, supernode_argv
from fedpeft.deploy.keys import make_keys
from fedpeft.deploy.netns import LINK, Loopback, Network

__all__ = ["BIN", "Cluster", "Procs", "free_port", "group_members", "node_host", "start_cluster", "wait_for"]

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``, read from /proc.

    ``os.killpg(pgid, 0)`` is not enough: it also succeeds while a killed child is a
    zombie waiting for init to reap it."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def node_host(node: NodeSpec) -> str:
    """The network host (namespace) SuperNode ``node`` runs in: ``n<index>``."""
    return f"n{node.index}"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Procs:
    """Processes started here; each is a session leader so its children stop with it."""

    env: dict[str, str]
    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: list[tuple[str, int]] = field(default_factory=list)  # every (name, PID) ever started

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running[name] = proc
        self.started.append((name, proc.pid))
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Stop ``name``'s process group: ``sig``, then SIGKILL after ``grace`` seconds."""
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)  # pgid == pid (start_new_session)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10.0  # killed children are reaped by init, not by us: give it a moment
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop_all(self) -> None:
        """Stop every running process, newest first; each one is stopped even if another fails."""
        errors: list[BaseException] = []
        for name in list(self.running)[::-1]:
            try:
                self.stop(name, grace=10.0)
            except Exception as exc:  # noqa: BLE001 -- keep stopping the others, re-raise below
                errors.append(exc)
        if errors:
            raise errors[0]

    def alive(self) -> list[tuple[str, int]]:
        """Processes started here whose process group (pgid == PID: the process and the
        children it started, e.g. ``flwr-clientapp``) still has a live member; empty after
        :meth:`stop_all`."""
        return [(name, pid) for name, pid in self.started if group_members(pid)]

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Cluster:
    """A running deployment (see :func:`start_cluster`); owns its processes and network."""

    root: Path
    procs: Procs
    port: int  # the SuperLink's port (Fleet, Control and Runtime APIs)
    connection: str
    nodes: list[NodeSpec]
    net: Network = field(default_factory=Loopback)

    @property
    def superlink(self) -> str:
        """The SuperLink's address as the ``flwr`` CLI (in the SuperLink's network) dials it."""
        return f"127.0.0.1:{self.port}"

    def superlink_for(self, where: str) -> str:
        """The SuperLink's address as seen from host ``where`` (``n1``, ...)."""
        return f"{self.net.superlink_host(where)}:{self.port}"

    @property
    def ca_cert(self) -> str:
        return str(self.root / "certs" / "ca.crt")

    def start(self, name: str, where: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name`` on host ``where`` (``LINK`` or ``n<i>``)."""
        return self.procs.start(name, self.net.exec_argv(where, argv), cwd=cwd or self.root)

    def run(self, where: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion on host ``where``; output captured."""
        return subprocess.run(self.net.exec_argv(where, argv), env=self.procs.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI in the SuperLink's network, where it reaches the Control API."""
        return self.run(LINK, [str(BIN / "flwr"), *args], timeout=timeout)

    def node_argv(self, node: NodeSpec, where: str | None = None, **kw: Any) -> list[str]:
        return supernode_argv(node, self.superlink_for(where or node_host(node)), self.ca_cert,
                              exe=str(BIN / "flower-supernode"), **kw)

    def start_node(self, node: NodeSpec) -> None:
        self.start(node.client_id, node_host(node), self.node_argv(node))

    def node_status(self) -> dict[str, str]:
        """node id -> status (``online``, ``offline``, ``registered``) as the SuperLink reports it."""
        res = self.flwr("supernode", "ls", self.connection, "--format", "json")
        if res.returncode != 0 or "{" not in res.stdout:
            return {}
        try:
            data = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            return {}
        return {str(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

    def node_id(self, client_id: str) -> str:
        """The SuperNode ID the node logged last (its identity at the SuperLink)."""
        found = re.findall(r"SuperNode ID: (\d+)", self.procs.log(client_id))
        return found[-1] if found else ""

    def stop(self) -> list[str]:
        """Stop every process (by PID, process group), then remove the network; return
        what could not be cleaned up (empty when clean)."""
        try:
            self.procs.stop_all()
        finally:
            problems = self.net.destroy()
        return problems


def start_cluster(root: Path, nodes: list[NodeSpec], connection: str = "fedpeft-local",
                  timeout: float = 240.0, net: Network | None = None, env: dict[str, str] | None = None,
                  port: int | None = None) -> Cluster:
    """Certificates, keys, SuperLink, registration and ``len(nodes)`` SuperNodes on ``net``.

    ``nodes`` carry the node configs; their key paths (and, on loopback, distinct runtime
    ports) are filled in here. Node *i* runs on host ``n<i>`` of ``net`` (loopback when
    None). ``env`` adds environment variables for every process (e.g. Flower settings).
    Returns once every SuperNode is online. The cluster owns ``net``: on any failure
    what was started is stopped and ``net`` is destroyed.
    """
    root = Path(root)
    net = net if net is not None else Loopback()
    for sub in ("logs", "flwr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "HF_HUB_OFFLINE": "1", "FEDPEFT_PROGRESS": "0",
                # Flower's telemetry and update check would dial flower.ai: traffic stays on this machine
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    procs = Procs(full_env, root / "logs")
    try:
        make_certs(root / "certs", net.san_hosts(), force=True)
        keys = make_keys(root / "keys", len(nodes), force=True)
        port = port or (free_port() if net.mode == "loopback" else 9093)
        cluster = Cluster(root, procs, port, connection, [], net)
        cluster.start("superlink", LINK, superlink_argv(str(root / "certs"), net.bind_host(), port,
                                                        database=str(root / "state.db"),
                                                        exe=str(BIN / "flower-superlink")))
        wait_for(lambda: net.probe(LINK, "127.0.0.1", port, timeout=2).connected, timeout,
                 "the SuperLink to listen")
        (root / "flwr" / "config.toml").write_text(connection_toml(connection, cluster.superlink, cluster.ca_cert))
        loopback = net.mode == "loopback"  # SuperNodes share one host: each needs its own runtime port
        cluster.nodes = [NodeSpec(**{**n.__dict__, "private_key": str(k.private), "public_key": str(k.public),
                                     "runtime_port": free_port() if loopback else n.runtime_port})
                         for n, k in zip(nodes, keys, strict=True)]
        for n in cluster.nodes:
            res = cluster.run(LINK, register_argv(n.public_key, connection, exe=str(BIN / "flwr")), timeout=timeout)
            if res.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
        for n in cluster.nodes:
            cluster.start_node(n)
        wait_for(lambda: list(cluster.node_status().values()).count("online") == len(nodes), timeout,
                 f"{len(nodes)} SuperNodes online", 3.0)
        return cluster
    except BaseException:
        try:
            procs.stop_all()
        finally:
            net.destroy()
        raise
