"""A deployed node's warm worker (src/fedpeft/client/warm.py) and its thin ClientApp.

The worker's loop runs in a thread of this process with :func:`fedpeft.client.app.train`
replaced by a stub, so the tests check the hand-over itself (the reply, the node's
``Context.state`` coming back, refusal and protocol texts crossing as they are, a worker
dying mid-round) in a second each. The real spawn through ``flwr-clientapp`` runs in
tests/test_deployment.py and benchmarks/deploy_overhead.py.
"""

from __future__ import annotations

import ast
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedpeft.client.app as client_app
import fedpeft.wire as wire
from fedpeft.client import warm
from fedpeft.client.errors import NodeRefusal

NODE_APP = Path(__file__).resolve().parents[1] / "src" / "fedpeft" / "client" / "node_app.py"


@pytest.fixture(autouse=True)
def _private_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    run = tempfile.mkdtemp(prefix="fw", dir="/tmp")  # short: a Unix socket path has at most 107 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", run)
    for name, value in (("_task_id", 3), ("_run_id", 1), ("_node_id", 7)):  # what flwr-clientapp sets
        monkeypatch.setattr(TaskIdentity, name, value)
    yield
    shutil.rmtree(run, ignore_errors=True)


def _node(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {wire.DATA_PATH: str(tmp_path / "node.csv"), wire.LEDGER_DIR: str(tmp_path / "ledger"),
            wire.CLIENT_ID: "node-1", **extra}


def _msg() -> Message:
    msg = Message(RecordDict({"arrays": wire.state_to_arrayrecord({"w": np.arange(3.0)})}), dst_node_id=7,
                  message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


@pytest.fixture()
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[..., Message]], Path]]:
    """Start the worker loop in a thread with ``train`` replaced; yields a starter."""
    threads: list[threading.Thread] = []

    def start(stub: Callable[..., Message]) -> Path:
        monkeypatch.setattr(client_app, "train", stub)
        path = warm.socket_path(_node(tmp_path))
        thread = threading.Thread(target=warm.serve, args=(path, None, 0.3), daemon=True)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return path

    yield start
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), "the worker did not stop after its idle time"


def test_a_deployed_node_uses_its_warm_worker_unless_told_not_to(tmp_path: Path) -> None:
    assert warm.use_warm_worker(_node(tmp_path))
    assert not warm.use_warm_worker(_node(tmp_path, **{wire.WARM_WORKER: "false"}))
    assert not warm.use_warm_worker(_node(tmp_path, **{wire.WARM_WORKER: False}))
    assert not warm.use_warm_worker({wire.PARTITION_ID: 0})  # a simulated client trains where it is
    with pytest.raises(NodeRefusal, match="warm-worker='maybe': must be true or false"):
        warm.use_warm_worker(_node(tmp_path, **{wire.WARM_WORKER: "maybe"}))


def test_one_private_socket_per_node_config(tmp_path: Path) -> None:
    a, b = warm.socket_path(_node(tmp_path)), warm.socket_path(_node(tmp_path, **{wire.CLIENT_ID: "node-2"}))
    assert a != b and a == warm.socket_path(_node(tmp_path))
    assert a.parent.stat().st_mode & 0o777 == 0o700
    a.parent.chmod(0o755)
    with pytest.raises(NodeRefusal, match="not private"):
        warm.socket_path(_node(tmp_path))


def test_the_round_and_the_node_state_cross_the_socket(tmp_path: Path, worker) -> None:  # type: ignore[no-untyped-def]
    seen: list[Any] = []

    def stub(msg: Message, context: Context) -> Message:
        seen.append(dict(msg.content.array_records["arrays"]))
        context.state["fedpeft-ledger"] = ConfigRecord({"json": "spent"})
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    worker(stub)
    context = Context(run_id=1, node_id=7, node_config=_node(tmp_path), state=RecordDict(), run_config={})
    for _ in range(2):  # the second round finds the same worker
        reply = warm.forward(_msg(), context)
        assert reply.content.config_records["config"]["ok"] == 1
        assert reply.metadata.reply_to_message_id == "m1"
    assert context.state.config_records["fedpeft-ledger"]["json"] == "spent"  # Flower stores this context
    assert len(seen) == 2 and list(seen[0]) == ["w"]


def test_refusals_and_protocol_errors_keep_their_safe_texts(tmp_path: Path, worker) -> None:  # type: ignore[no-untyped-def]
    texts = iter(["budget exceeded at round 2", "boom: the secret label is 'positive'"])

    def stub(msg: Message, context: Context) -> Message:
        text = next(texts)
        if text.startswith("budget"):
            raise NodeRefusal(text)
        raise wire.ProtocolError("missing key 'config'")

    worker(stub)
    context = Context(run_id=1, node_id=7, node_config=_node(tmp_path), state=RecordDict(), run_config={})
    with pytest.raises(NodeRefusal, match="^budget exceeded at round 2$"):
        warm.forward(_msg(), context)
    with pytest.raises(wire.ProtocolError, match="missing key 'config'"):
        warm.forward(_msg(), context)


def test_any_other_failure_is_a_generic_refusal(tmp_path: Path, worker) -> None:  # type: ignore[no-untyped-def]
    def stub(msg: Message, context: Context) -> Message:
        raise RuntimeError("boom: the secret label is 'positive'")  # its text stays on the node

    worker(stub)
    context = Context(run_id=1, node_id=7, node_config=_node(tmp_path), state=RecordDict(), run_config={})
    with pytest.raises(NodeRefusal, match="^training failed on the node; details are in the node's log$"):
        warm.forward(_msg(), context)


def test_a_worker_dying_mid_round_is_a_refusal(tmp_path: Path) -> None:
    path = warm.socket_path(_node(tmp_path))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def die() -> None:  # reads the request, then goes away without a reply
        conn, _ = srv.accept()
        conn.recv(16)
        conn.close()

    thread = threading.Thread(target=die, daemon=True)
    thread.start()
    context = Context(run_id=1, node_id=7, node_config=_node(tmp_path), state=RecordDict(), run_config={})
    try:
        with pytest.raises(NodeRefusal, match="its worker stopped"):
            warm.forward(_msg(), context)
    finally:
        thread.join(timeout=5)
        srv.close()


def test_the_thin_app_imports_no_training_stack() -> None:
    names = [n.module for n in ast.walk(ast.parse(NODE_APP.read_text())) if isinstance(n, ast.ImportFrom)
             and n.col_offset == 0 and n.module]
    assert all(not n.startswith(("torch", "transformers", "peft", "opacus", "fedpeft.client.app")) for n in names)


def test_a_warm_runtime_reads_a_changed_node_file_again(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The worker outlives rounds and runs: a node's edited data file is not served stale."""
    from fedpeft.client.runtime import ClientIdentity, Runtime

    path = tmp_path / "node.csv"
    path.write_text("text,label\ngood,fresh\nbad,rotten\nfine,fresh\n")
    rt = Runtime(tiny_cfg)
    ident = ClientIdentity("n1", None, str(path), tmp_path / "ledger", ("fresh", "rotten"))
    node = {wire.TEXT_COLUMN: "text", wire.LABEL_COLUMN: "label"}
    first = rt.data_for(ident, node)
    assert rt.data_for(ident, node) is first and len(first) == 3  # unchanged: cached
    path.write_text("text,label\ngood,fresh\nbad,rotten\nfine,fresh\nawful,rotten\n")
    assert len(rt.data_for(ident, node)) == 4
