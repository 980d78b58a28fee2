"""A deployed node's warm worker: one long-lived process that trains every round of the node.

Why: Flower 1.42's SuperNode (``--isolation subprocess``) starts a new ``flwr-clientapp``
process for every message, *after* the message arrived (``flwr.supercore.superexec``'s
``SubprocessExecutor``; its prestarted single-use workers, ``flwr.supercore.task_worker``,
serve only AgentApp / Model / Connector tasks on Kubernetes, not ClientApps). So every
round paid Python start, the imports of torch / transformers / PEFT / Opacus, the model
load and the data read -- ~20 s of a ~25 s deployed round on the tiny model (docs/deploy.md).

What: the per-message ``flwr-clientapp`` runs the thin :mod:`fedpeft.client.node_app`, which
hands the round's ``(Message, Context)`` to this worker over a Unix socket and returns its
reply. The worker runs :func:`fedpeft.client.app.train` -- the same code, the same checks,
the same ledger and node secret -- in a process that keeps its imports, its
:class:`~fedpeft.client.runtime.Runtime` (model, tokenizer, data) between rounds, exactly
as a simulation worker does. The first round starts it (and pays the start-up); later
rounds find it warm.

Where things live (all on the node, nothing the server can reach):

* the socket is ``$XDG_RUNTIME_DIR`` (else the temp dir) ``/fedpeft-worker-<uid>/<key>.sock``
  in a directory of mode 0700 owned by the node's user (checked), the socket 0600, and the
  worker also checks the connecting peer's uid (``SO_PEERCRED``); the key hashes the fedpeft
  source location and version, the Python executable, and the node's ledger dir, client id
  and data path, so another code version or another node config gets its own worker;
* the frames are pickles, accepted only from the node's own user (as above).

Lifetime (what it starts, it stops): the worker stays in the SuperNode's process group
(stopping the group stops it), exits when the ``flower-superexec`` that started its first
``flwr-clientapp`` is gone (checked every second), and after ``warm-idle-s`` seconds
(node config, default :data:`DEFAULT_IDLE_S`) without a round. ``warm-worker=false`` in the
node config trains in the ``flwr-clientapp`` process itself, as before.

Failures keep the module rules of :mod:`fedpeft.client.app`: a worker that cannot start or
dies mid-round is a :class:`~fedpeft.client.errors.NodeRefusal` with a generic text (details
in the node's log); refusals and protocol errors cross the socket as their safe texts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fedpeft.wire as wire
from fedpeft.client.errors import NodeRefusal
from fedpeft.io import file_lock

__all__ = ["DEFAULT_IDLE_S", "forward", "serve", "socket_path", "use_warm_worker"]

log = logging.getLogger("fedpeft.client.warm")

PACKAGE = Path(__file__).resolve().parents[1]  # this fedpeft (src/fedpeft)
DEFAULT_IDLE_S = 1800.0
START_TIMEOUT_S = 600.0  # imports + (on a loaded machine) a slow disk
_FRAME = struct.Struct("!Q")
_PEERCRED = struct.Struct("3i")


def use_warm_worker(node_config: Mapping[str, Any]) -> bool:
    """A deployed node (``data-path`` set) trains in its warm worker unless ``warm-worker=false``."""
    if not node_config.get(wire.DATA_PATH):
        return False
    value = node_config.get(wire.WARM_WORKER, True)
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise NodeRefusal(f"node config {wire.WARM_WORKER}={value!r}: must be true or false")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _idle_s(node_config: Mapping[str, Any]) -> float:
    raw = node_config.get(wire.WARM_IDLE_S, DEFAULT_IDLE_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise NodeRefusal(f"node config {wire.WARM_IDLE_S}={raw!r}: must be a positive number of seconds")
    return value


def _private_dir() -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"fedpeft-worker-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise NodeRefusal("the warm worker's socket directory is not private to this node's user; "
                          "remove it or set warm-worker=false")
    return base


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedpeft")
    except PackageNotFoundError:
        return "source"


def socket_path(node_config: Mapping[str, Any]) -> Path:
    """This node's worker socket (module doc: one worker per code version and node config)."""
    ledger = Path(str(node_config.get(wire.LEDGER_DIR) or "ledger")).resolve()
    key = "|".join([_version(), str(PACKAGE), sys.executable, str(ledger),
                    str(node_config.get(wire.CLIENT_ID, "")), str(node_config.get(wire.DATA_PATH, ""))])
    return _private_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def _send(conn: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_FRAME.pack(len(data)) + data)


def _exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> Any:
    (n,) = _FRAME.unpack(_exact(conn, _FRAME.size))
    return pickle.loads(_exact(conn, n))  # noqa: S301 - only from this node's own user (module doc)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """One lock file per ``path`` (``.lock`` beside it)."""
    return file_lock(path.with_suffix(".lock"))


def _spawn(path: Path, node_config: Mapping[str, Any]) -> socket.socket:
    """Start this node's worker (same process group as the SuperNode) and connect to it."""
    src = str(PACKAGE.parent)  # the same fedpeft as this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [sys.executable, "-m", "fedpeft.client.warm", "--socket", str(path), "--watch-pid", str(os.getppid()),
            "--idle-s", str(_idle_s(node_config))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, close_fds=True)  # noqa: S603
    log.info("started this node's warm worker (pid %d)", proc.pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (conn := _connect(path)) is not None:
            return conn
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    raise NodeRefusal("the node's warm worker could not start; details are in the node's log")


def forward(msg: Any, context: Any) -> Any:
    """Run this round in the node's warm worker (started if needed); return its reply.

    The worker's ``Context.state`` after the round (ledger copy, local state) replaces this
    process's, which Flower then stores for the node's next round.
    """
    node = dict(context.node_config)
    path = socket_path(node)
    with _locked(path):
        conn = _connect(path) or _spawn(path, node)
        with conn:
            try:
                _send(conn, (msg, context, _task_identity()))
                kind, *rest = _recv(conn)
            except (OSError, ConnectionError, EOFError, pickle.UnpicklingError):
                log.exception("the node's warm worker stopped during the round")
                raise NodeRefusal("training failed on the node (its worker stopped); details are in the node's "
                                  "log") from None
    if kind == "reply":
        reply, state = rest
        context.state = state
        return reply
    if kind == "protocol":
        raise wire.ProtocolError(rest[0])
    raise NodeRefusal(rest[0])


def _task_identity() -> tuple[int | None, ...]:
    """Flower's identity of the running task (set by ``flwr-clientapp``; unset in tests)."""
    from flwr.supercore.task_identity import TaskIdentity

    out: list[int | None] = []
    for name in ("task_id", "run_id", "node_id"):
        try:
            out.append(getattr(TaskIdentity, name))
        except RuntimeError:
            out.append(None)
    return tuple(out)


def _handle(request: Any) -> tuple[Any, ...]:
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.client.app import train

    msg, context, identity = request
    for name, value in zip(("task_id", "run_id", "node_id"), identity, strict=True):
        if value is not None:  # what Flower's own process had set (replies copy reply_to's metadata anyway)
            setattr(TaskIdentity, name, value)
    try:
        reply = train(msg, context)  # maps every other failure to a generic NodeRefusal (logged here)
    except wire.ProtocolError as exc:
        return ("protocol", str(exc))
    except NodeRefusal as exc:
        return ("refusal", str(exc))
    except Exception:  # noqa: BLE001 - defensive: train() already maps failures; keep the worker alive
        log.exception("training failed on this node")
        return ("refusal", "training failed on the node; details are in the node's log")
    return ("reply", reply, context.state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def serve(path: Path, watch_pid: int | None, idle_s: float) -> int:
    """The worker's loop: warm up (imports), listen, serve one round per connection, in turn."""
    import fedpeft.client.app  # noqa: F401 - the warm-up: torch, transformers, PEFT, Opacus, once

    if threading.current_thread() is threading.main_thread():  # SIGTERM (the SuperNode's group stopped):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through `finally`, removing the socket
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o600)
    inode = path.stat().st_ino
    srv.listen(4)
    srv.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s and (watch_pid is None or _alive(watch_pid)):
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if _peer_uid(conn) != os.getuid():
                    log.warning("refused a connection from another user")
                    continue
                try:
                    request = _recv(conn)
                    started = time.perf_counter()
                    answer = _handle(request)
                    log.info("warm worker: round served in %.2f s (%s)", time.perf_counter() - started, answer[0])
                    _send(conn, answer)
                except (OSError, ConnectionError, EOFError, pickle.UnpicklingError):
                    log.exception("a round's connection to the warm worker failed")
            last = time.monotonic()
    finally:
        srv.close()
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # still ours (not a newer worker's)
                path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedpeft.client.warm", description="a fedpeft node's warm worker")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--watch-pid", type=int, default=None)
    p.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.socket, args.watch_pid, args.idle_s)


if __name__ == "__main__":
    raise SystemExit(main())
