"""Where a local deployment rehearsal runs: loopback, or Linux network namespaces.

A real deployment has a SuperLink host and one host per SuperNode. On one machine the
closest rehearsal is one network namespace per "host": :class:`NetnsLab` makes a
namespace for the SuperLink and one per peer (SuperNode or outsider), each peer joined to
the SuperLink's namespace by its own veth pair on its own /30 subnet
(``10.86.<i>.1`` on the SuperLink side, ``10.86.<i>.2`` on the peer side). Every
namespace has only ``lo`` and its veth end and **no default route**, so a peer reaches
its own loopback and the SuperLink's address on its pair, and nothing else: not the other
peers, not this machine's real interfaces, not the internet. The veth pairs are created
directly inside the namespaces (``ip link add ... netns A type veth peer ... netns B``),
so nothing ever appears in the machine's own namespace, and deleting the namespaces
deletes the pairs.

Processes run in a namespace through ``ip netns exec NS argv...``, which *execs* ``argv``
after entering the namespace: the PID that :class:`subprocess.Popen` holds is the real
process (``/proc/PID/cmdline`` is ``argv``), so stopping by PID or process group works as
on loopback. Needs root (``CAP_SYS_ADMIN``) and iproute2; :func:`netns_unavailable`
says why not, and :class:`Loopback` is the same interface on 127.0.0.1.

Rehearse by hand (as root)::

    lab = NetnsLab.create(["n1", "n2", "n3"])
    lab.exec_argv("link", ["flower-superlink", "--host", "0.0.0.0", ...])   # in the SuperLink's namespace
    lab.exec_argv("n1", ["flower-supernode", "--superlink", f"{lab.superlink_host('n1')}:9093", ...])
    ...
    lab.destroy()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["LINK", "Loopback", "NetnsError", "NetnsLab", "Network", "Peer", "Probe", "make_network", "netns_unavailable",
           "probe"]

LINK = "link"  # the name of the SuperLink's namespace ("host") in every Network
NETNS_DIR = "/run/netns"  # where `ip netns add` pins namespaces

_PROBE = """
import json, socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
out = {"connected": False, "errno": 0, "error": "", "answer": ""}
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        out["connected"] = True
        if payload:
            s.sendall(payload)
            try:
                out["answer"] = s.recv(64).hex()
            except OSError as exc:
                out["error"] = type(exc).__name__
except OSError as exc:
    out["errno"], out["error"] = exc.errno or 0, type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


class NetnsError(RuntimeError):
    """A namespace or veth operation failed; the message names the command and its error."""


@dataclass(frozen=True)
class Probe:
    """The outcome of one TCP connection attempt (see :func:`probe`)."""

    connected: bool
    errno: int = 0
    error: str = ""
    answer: bytes = b""


def probe(host: str, port: int, payload: bytes = b"", timeout: float = 5.0, prefix: Sequence[str] = ()) -> Probe:
    """Try a TCP connection to ``host:port`` from a fresh Python process run with ``prefix``
    (e.g. ``ip netns exec NS``), send ``payload`` and read up to 64 bytes of answer."""
    argv = [*prefix, sys.executable, "-I", "-c", _PROBE, host, str(port), payload.hex(), str(timeout)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    if res.returncode != 0 or not res.stdout.strip():
        raise NetnsError(f"probe of {host}:{port} failed to run: {res.stderr.strip()[-300:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return Probe(bool(out["connected"]), int(out["errno"]), str(out["error"]), bytes.fromhex(out["answer"]))


class Network(Protocol):
    """Where the SuperLink (``LINK``) and each peer (``"n1"``, ...) of a rehearsal run."""

    mode: str  # "loopback" or "netns"

    def describe(self) -> str:
        """One line for logs and ``network_mode.txt``."""
        ...

    def bind_host(self) -> str:
        """The address the SuperLink binds to."""
        ...

    def superlink_host(self, where: str) -> str:
        """The SuperLink's address as seen from ``where`` (``LINK`` or a peer name)."""
        ...

    def san_hosts(self) -> list[str]:
        """Addresses the SuperLink's TLS certificate must name (besides localhost/127.0.0.1)."""
        ...

    def exec_argv(self, where: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped so that it runs in ``where``'s network."""
        ...

    def probe(self, where: str, host: str, port: int, payload: bytes = b"", timeout: float = 5.0) -> Probe:
        """A TCP connection attempt from ``where`` (see :func:`probe`)."""
        ...

    def destroy(self) -> list[str]:
        """Remove what was set up; return what could not be removed (empty when clean)."""
        ...


@dataclass
class Loopback:
    """Everything on this machine's 127.0.0.1: no isolation, works without root."""

    mode: str = "loopback"
    reason: str = ""  # why not network namespaces, when that was asked for

    def describe(self) -> str:
        return "loopback (127.0.0.1)" + (f"; network namespaces unavailable: {self.reason}" if self.reason else "")

    def bind_host(self) -> str:
        return "127.0.0.1"

    def superlink_host(self, where: str) -> str:
        return "127.0.0.1"

    def san_hosts(self) -> list[str]:
        return []

    def exec_argv(self, where: str, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def probe(self, where: str, host: str, port: int, payload: bytes = b"", timeout: float = 5.0) -> Probe:
        return probe(host, port, payload, timeout)

    def destroy(self) -> list[str]:
        return []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; :class:`NetnsError` with the command and its stderr on failure."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def netns_unavailable() -> str:
    """Why network namespaces cannot be used here ("" when they can): not root, no iproute2,
    or creating a namespace fails (e.g. inside an unprivileged container). Tries for real:
    adds and deletes a namespace named after this process."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` not found"
    name = f"fpt-{os.getpid()}-check-{secrets.token_hex(2)}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    res = _ip("netns", "exec", name, "ip", "link", "set", "lo", "up", check=False)
    _ip("netns", "del", name, check=False)
    return "" if res.returncode == 0 else f"`ip netns exec` failed: {res.stderr.strip()}"


@dataclass(frozen=True)
class Peer:
    """One peer namespace and its veth pair to the SuperLink's namespace."""

    name: str  # "n1", ...
    namespace: str  # e.g. fpt-1234-ab12-n1
    link_ip: str  # the SuperLink's address on this pair (what this peer dials)
    peer_ip: str  # this peer's own address
    link_dev: str  # the pair's end in the SuperLink's namespace
    peer_dev: str = "eth0"  # the pair's end in the peer's namespace


@dataclass
class NetnsLab:
    """A SuperLink namespace plus one namespace per peer, each joined by a veth pair.

    Create with :meth:`create`; always :meth:`destroy` (it is idempotent). Namespace names
    are ``fpt-<pid>-<random>-link`` and ``fpt-<pid>-<random>-<peer>``, so concurrent
    labs (and other users' namespaces) never clash.
    """

    prefix: str
    peers: dict[str, Peer] = field(default_factory=dict)
    mode: str = "netns"
    created: list[str] = field(default_factory=list)  # namespaces that exist and are ours

    @property
    def link_ns(self) -> str:
        return f"{self.prefix}-{LINK}"

    @classmethod
    def create(cls, peers: Sequence[str], subnet: str = "10.86") -> NetnsLab:
        """Make the namespaces and veth pairs for ``peers`` (names of 1-6 letters/digits).

        Peer *i* (1-based, in order) gets ``<subnet>.<i>.0/30``: the SuperLink's side is
        ``.1``, the peer's ``.2``. ``lo`` is up everywhere; no default routes. On failure
        everything made so far is removed and :class:`NetnsError` is raised.
        """
        if not peers or len(set(peers)) != len(peers) or LINK in peers:
            raise NetnsError(f"invalid peer names {list(peers)!r}: unique, non-empty, not {LINK!r}")
        for p in peers:
            if not (p.isalnum() and 1 <= len(p) <= 6):
                raise NetnsError(f"invalid peer name {p!r}: 1-6 letters or digits")
        lab = cls(prefix=f"fpt-{os.getpid()}-{secrets.token_hex(2)}")
        try:
            lab._add_ns(lab.link_ns)
            for i, name in enumerate(peers, start=1):
                peer = Peer(name, f"{lab.prefix}-{name}", f"{subnet}.{i}.1", f"{subnet}.{i}.2", f"v{name}")
                lab._add_ns(peer.namespace)
                _ip("link", "add", peer.link_dev, "netns", lab.link_ns, "type", "veth",
                    "peer", "name", peer.peer_dev, "netns", peer.namespace)
                for ns, dev, addr in ((lab.link_ns, peer.link_dev, peer.link_ip),
                                      (peer.namespace, peer.peer_dev, peer.peer_ip)):
                    _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                    _ip("-n", ns, "link", "set", dev, "up")
                lab.peers[name] = peer
        except BaseException:
            lab.destroy()
            raise
        return lab

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def describe(self) -> str:
        pairs = ", ".join(f"{p.name}={p.peer_ip}->{p.link_ip}" for p in self.peers.values())
        return f"netns: SuperLink in {self.link_ns}; veth pairs {pairs}; no default routes"

    def namespace(self, where: str) -> str:
        if where == LINK:
            return self.link_ns
        if where not in self.peers:
            raise NetnsError(f"unknown host {where!r}; this lab has {LINK!r} and {sorted(self.peers)}")
        return self.peers[where].namespace

    def bind_host(self) -> str:
        return "0.0.0.0"  # inside the SuperLink's namespace: its loopback and its veth ends only

    def superlink_host(self, where: str) -> str:
        if where == LINK:
            return "127.0.0.1"
        self.namespace(where)  # one-line error for an unknown name
        return self.peers[where].link_ip

    def san_hosts(self) -> list[str]:
        return [p.link_ip for p in self.peers.values()]

    def exec_argv(self, where: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(where), *argv]

    def probe(self, where: str, host: str, port: int, payload: bytes = b"", timeout: float = 5.0) -> Probe:
        return probe(host, port, payload, timeout, prefix=["ip", "netns", "exec", self.namespace(where)])

    def pids(self, where: str) -> list[int]:
        """PIDs of the processes running in ``where``'s namespace (``ip netns pids``)."""
        res = _ip("netns", "pids", self.namespace(where), check=False)
        return [int(x) for x in res.stdout.split() if x.isdigit()]

    def destroy(self) -> list[str]:
        """Delete this lab's namespaces (and with them the veth pairs). Processes still in a
        namespace would keep it alive, so stop them first; any found are listed in the
        returned problems (and killed, by PID: they can only be ours)."""
        problems: list[str] = []
        for ns in list(self.created)[::-1]:
            res = _ip("netns", "pids", ns, check=False)
            left = [int(x) for x in res.stdout.split() if x.isdigit()]
            if left:
                problems.append(f"processes {left} ({', '.join(_cmdline(p) for p in left)}) were still running in "
                                f"{ns}; killed")
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, ns)):
                problems.append(f"`ip netns del {ns}` failed: {res.stderr.strip()}")
                continue
            self.created.remove(ns)
        return problems


def make_network(peers: Sequence[str], want: str = "auto") -> Network:
    """``want="auto"``: network namespaces for ``peers`` when :func:`netns_unavailable` says
    they work, else :class:`Loopback` (its ``describe()`` says why); ``"netns"``: namespaces
    or :class:`NetnsError`; ``"loopback"``: loopback."""
    if want not in ("auto", "netns", "loopback"):
        raise NetnsError(f"invalid network {want!r}: auto, netns or loopback")
    if want == "loopback":
        return Loopback()
    reason = netns_unavailable()
    if not reason:
        return NetnsLab.create(peers)
    if want == "netns":
        raise NetnsError(f"network namespaces unavailable: {reason}")
    return Loopback(reason=reason)


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` (for a problem report), or "?" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"
