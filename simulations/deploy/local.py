"""A real deployment on this machine's loopback: SuperLink + N SuperNodes, TLS and auth on.

Used by the integration tests (``tests/test_deployment.py``) and the overhead benchmark
(``benchmarks/deploy_overhead.py``). The processes are started from the same argument
lists ``fedpeft deploy print-commands`` prints (:mod:`simulations.deploy.commands`), each
in its own session (process group), and :meth:`Procs.stop` ends them by PID: SIGTERM to
the group, then SIGKILL. Everything binds or dials 127.0.0.1; ``FLWR_HOME`` is a private
directory, so the user's ``~/.flwr`` is never touched.
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

from simulations.deploy.certs import make_certs
from simulations.deploy.commands import NodeSpec, connection_toml, register_argv, superlink_argv, supernode_argv
from simulations.deploy.keys import make_keys

__all__ = ["BIN", "Cluster", "Procs", "free_port", "start_cluster", "wait_for"]

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running[name] = proc
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

    def stop_all(self) -> None:
        for name in list(self.running)[::-1]:
            self.stop(name, grace=10.0)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Cluster:
    """A running loopback deployment (see :func:`start_cluster`)."""

    root: Path
    procs: Procs
    superlink: str
    connection: str
    nodes: list[NodeSpec]

    @property
    def ca_cert(self) -> str:
        return str(self.root / "certs" / "ca.crt")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.procs.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def node_argv(self, node: NodeSpec, **kw: Any) -> list[str]:
        return supernode_argv(node, self.superlink, self.ca_cert, exe=str(BIN / "flower-supernode"), **kw)

    def start_node(self, node: NodeSpec) -> None:
        self.procs.start(node.client_id, self.node_argv(node), cwd=self.root)

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

    def stop(self) -> None:
        self.procs.stop_all()


def start_cluster(root: Path, nodes: list[NodeSpec], connection: str = "fedpeft-local",
                  timeout: float = 240.0) -> Cluster:
    """Certificates, keys, SuperLink, registration and ``len(nodes)`` SuperNodes on loopback.

    ``nodes`` carry the node configs; their key paths and runtime ports are filled in here.
    Returns once every SuperNode is online. On any failure what was started is stopped.
    """
    root = Path(root)
    for sub in ("logs", "flwr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "FEDPEFT_PROGRESS": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Procs(env, root / "logs")
    try:
        make_certs(root / "certs", force=True)
        keys = make_keys(root / "keys", len(nodes), force=True)
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        procs.start("superlink", superlink_argv(str(root / "certs"), "127.0.0.1", port,
                                                database=str(root / "state.db"), exe=str(BIN / "flower-superlink")),
                    cwd=root)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout, "the SuperLink to listen")
        (root / "flwr" / "config.toml").write_text(connection_toml(connection, superlink, str(root / "certs/ca.crt")))
        specs = [NodeSpec(**{**n.__dict__, "private_key": str(k.private), "public_key": str(k.public),
                             "runtime_port": free_port()}) for n, k in zip(nodes, keys, strict=True)]
        cluster = Cluster(root, procs, superlink, connection, specs)
        for n in specs:
            res = subprocess.run(register_argv(n.public_key, connection, exe=str(BIN / "flwr")), env=env,
                                 capture_output=True, text=True, timeout=timeout, cwd=root)
            if res.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
        for n in specs:
            cluster.start_node(n)
        wait_for(lambda: list(cluster.node_status().values()).count("online") == len(specs), timeout,
                 f"{len(specs)} SuperNodes online", 3.0)
        return cluster
    except BaseException:
        procs.stop_all()
        raise
