"""Privacy attacks by the server against fedpeft's own client path (issue 16).

The adversary is the honest-but-curious server: it runs the code, knows every value it
sends (configuration, seeds, round numbers, partition ids, global state) and reads every
reply. Each test plays that adversary through ``handle_train`` -- the real ClientApp -- and
fails if the guarantee breaks.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from inprocess_grid import NodeIds

from fedpeft.client.app import handle_train
from fedpeft.config import config_hash, config_to_toml
from fedpeft.privacy.ledger import Ledger
from fedpeft.server.loop import ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord

# What a DP reply may carry (src/fedpeft/client/app.py): the trained state and public values only.
PUBLIC_METRICS = {"num-examples", "steps", "bytes-up", "epsilon", "delta", "noise-multiplier", "sample-rate"}


def _server(cfg, ledger_dir: Path):  # type: ignore[no-untyped-def]
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(ledger_dir)})
    return setup, strategy


def _message(setup, strategy, server_round: int) -> Message:  # type: ignore[no-untyped-def]
    content = RecordDict({"arrays": state_to_arrayrecord(setup.state), "config": strategy.round_config(server_round)})
    return Message(content=content, dst_node_id=7, message_type="train")


def _node(pid: int = 0, **node_config) -> Context:  # type: ignore[no-untyped-def]
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3, **node_config},
                   state=RecordDict(), run_config={})


def _update(reply: Message, setup: ServerSetup) -> np.ndarray:
    arrays = reply.content["arrays"]
    return np.concatenate([(arrays[k].numpy() - setup.state[k]).ravel() for k in sorted(setup.state)])


@pytest.fixture()
def sgd_cfg(tiny_cfg):  # type: ignore[no-untyped-def]
    """One SGD step per round on the tiny model: the release is -lr (S + Z) / B."""
    return dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, optimizer="sgd", lr=0.5, local_steps=1, rounds=1))


def test_server_cannot_regenerate_noise_from_what_it_knows(sgd_cfg, tmp_path: Path, flwr_identity,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The server replays the client's computation with everything it knows (the same message,
    node config and even the client's data): if the noise and batches came from anything it
    knows, its replica's release would equal the client's, and release minus replica noise
    would give the clipped gradient sum (before the fix: to ~1e-7). With the node's secret the
    two releases differ by the size of the noise."""
    setup, strategy = _server(sgd_cfg, tmp_path / "ledger")
    msg = _message(setup, strategy, 1)
    monkeypatch.setenv("FEDPEFT_SECRET_HOME", str(tmp_path / "node-a"))
    client = handle_train(msg, _node())
    # the server's replica: same inputs, its own disk (it cannot have the node's secret file)
    monkeypatch.setenv("FEDPEFT_SECRET_HOME", str(tmp_path / "server-replica"))
    replica = _replica(msg, tmp_path)
    sigma = float(client.content["metrics"]["noise-multiplier"])
    d = sum(v.size for v in setup.state.values())
    n = int(client.content["metrics"]["num-examples"])
    q = float(client.content["metrics"]["sample-rate"])
    expected_batch = int(n * q)
    # two independent noise draws: ||Z1 - Z2|| ~ sqrt(2 d) sigma C per coordinate sum, times lr / B
    noise_scale = sgd_cfg.train.lr * sigma * sgd_cfg.privacy.clip * math.sqrt(2 * d) / expected_batch
    error = float(np.linalg.norm(_update(client, setup) - _update(replica, setup)))
    assert error > 0.5 * noise_scale, f"server regenerated the client's randomness (error {error:.2e})"


def _replica(msg: Message, tmp_path: Path) -> Message:
    """The server's replay of the client on its own machine: a fresh node (ledger and secret
    of its own), otherwise the identical message and node config."""
    conf = ConfigRecord(dict(msg.content["config"].items()))
    conf["ledger-dir"] = str(tmp_path / "replica-ledger")
    content = RecordDict({"arrays": msg.content["arrays"], "config": conf})
    return handle_train(Message(content=content, dst_node_id=7, message_type="train"), _node())


def test_replayed_round_resends_the_stored_release_and_is_charged_once(sgd_cfg, tmp_path: Path, flwr_identity,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _server(sgd_cfg, tmp_path / "ledger")
    first = handle_train(_message(setup, strategy, 1), _node())

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a replayed round must not be recomputed")

    monkeypatch.setattr("fedpeft.client.app.train_local", no_training)
    again = handle_train(_message(setup, strategy, 1), _node())  # a fresh process: empty Context.state
    np.testing.assert_array_equal(_update(first, setup), _update(again, setup))
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    ledger = Ledger.from_json((tmp_path / "ledger" / "client-0.json").read_text())
    assert len(ledger.entries) == 1


def test_dp_reply_carries_only_the_state_and_public_values(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _server(tiny_cfg, tmp_path / "ledger")
    reply = handle_train(_message(setup, strategy, 1), _node())
    assert set(reply.content.keys()) == {"arrays", "metrics", "info"}
    assert set(reply.content["metrics"].keys()) <= PUBLIC_METRICS
    assert set(reply.content["info"].keys()) <= {"client", "frozen-hash", "accountant", "profile"}
    assert set(reply.content["arrays"].keys()) == set(setup.spec.tensors)
    # the state is the trained B + head only, never A
    assert not any("lora_A" in k for k in reply.content["arrays"])


def test_a_node_capped_at_its_own_delta_refuses_a_large_delta_server(tiny_cfg, tmp_path: Path,
                                                                      flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """A server asking for epsilon 8 at delta 0.5 gets a sigma that is epsilon ~ 64 at 1e-5."""
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy, epsilon=8.0, delta=0.5))
    setup, strategy = _server(cfg, tmp_path / "ledger")
    reply = handle_train(_message(setup, strategy, 1), _node(**{"max-epsilon": 8.0}))
    status = reply.content["status"]
    assert status["refused"] and "max-delta" in str(status["reason"])
    assert "arrays" not in reply.content
    assert not (tmp_path / "ledger" / "client-0.json").exists()  # nothing trained, nothing stored, nothing spent
    # and the server counts it as a refusal, not as a bad reply
    strategy.configure_train(1, state_to_arrayrecord(setup.state), ConfigRecord(), NodeIds(7, 8, 9))
    strategy.aggregate_train(1, [reply])
    assert set(strategy.report.refused) == {"0"} and not strategy.report.rejected and not strategy.report.accepted


def test_node_cap_at_the_nodes_delta_refuses_through_handle_train(tiny_cfg, tmp_path: Path,
                                                                  flwr_identity) -> None:  # type: ignore[no-untyped-def]
    setup, strategy = _server(tiny_cfg, tmp_path / "ledger")
    reply = handle_train(_message(setup, strategy, 1), _node(**{"max-epsilon": 0.5}))
    assert reply.content["status"]["refused"] and "max-epsilon=0.5" in str(reply.content["status"]["reason"])
    assert "arrays" not in reply.content
    assert not (tmp_path / "ledger" / "client-0.json").exists()  # a refused plan is not stored
    floor = handle_train(_message(setup, strategy, 1), _node(**{"min-noise-multiplier": 50.0}))
    assert "min-noise-multiplier" in str(floor.content["status"]["reason"])


def test_data_errors_stay_on_the_node(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "private.csv"
    data.write_text("diagnosis_text,patient_label\nchest pain,cardiac-ward-7\n", encoding="utf-8")
    setup, strategy = _server(tiny_cfg, tmp_path / "ledger")
    node = {"data-path": str(data), "ledger-dir": str(tmp_path / "node"), "client-id": "n1",
            "text-column": "text", "label-column": "label"}
    reply = handle_train(_message(setup, strategy, 1), Context(run_id=1, node_id=7, node_config=node,
                                                               state=RecordDict(), run_config={}))
    reason = str(reply.content["status"]["reason"])
    assert reply.content["status"]["refused"] and "node's log" in reason
    for private in ("diagnosis_text", "patient_label", "cardiac", "chest", str(data)):
        assert private not in reason


def test_deployed_node_needs_its_own_ledger_dir(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.client.app import NodeRefusal

    setup, strategy = _server(tiny_cfg, tmp_path / "ledger")
    node = {"data-path": str(tmp_path / "x.csv"), "client-id": "n1"}
    with pytest.raises(NodeRefusal, match="ledger-dir"):
        handle_train(_message(setup, strategy, 1), Context(run_id=1, node_id=7, node_config=node,
                                                           state=RecordDict(), run_config={}))


def test_unexpected_failures_reach_the_server_without_their_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.client import app as client_app

    def leaky(msg, context):  # type: ignore[no-untyped-def]
        raise ValueError("label 'patient-4711-hiv-positive' not in the federation's labels")

    monkeypatch.setattr(client_app, "handle_train", leaky)
    with pytest.raises(client_app.NodeRefusal) as err:
        client_app.train(None, None)  # type: ignore[arg-type]
    assert "patient" not in str(err.value) and "node's log" in str(err.value)


def test_server_side_code_never_touches_node_secrets() -> None:
    """No module the server runs imports the node-secret code (a static check of imports)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "fedpeft"
    forbidden = {"fedpeft.privacy.randomness", "fedpeft.client.node_store", "fedpeft.client"}
    for folder in ("server", "strategies"):
        paths = sorted((root / folder).rglob("*.py"))
        assert paths, f"nothing to scan in {root / folder}"  # a moved folder must not pass vacuously
        for path in paths:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path}: {name}"


def test_reported_epsilon_is_read_from_every_kind_of_reply(flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from flwr.app import MetricRecord

    from fedpeft.server.loop import reported_epsilon

    sent = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    ok = RecordDict({"metrics": MetricRecord({"epsilon": 2.5}), "info": ConfigRecord({"client": "a"})})
    lost = RecordDict({"status": ConfigRecord({"timed-out": True, "client": "b", "epsilon": 3.0})})
    refused = RecordDict({"status": ConfigRecord({"refused": True, "client": "c", "epsilon": 1.0})})
    bad = RecordDict({"metrics": MetricRecord({"epsilon": float("nan")}), "info": ConfigRecord({"client": "d"})})
    got = [reported_epsilon(Message(content=c, reply_to=sent)) for c in (ok, lost, refused, bad)]
    assert got == [("a", 2.5), ("b", 3.0), ("c", 1.0), None]


def test_rounds_outside_the_plan_and_refused_plans_leave_nothing_behind(tiny_cfg, tmp_path: Path,
                                                                        flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """An active server tries to slip past a node's cap: first it asks for a huge epsilon (the
    node refuses, and must not keep the plan it was asked for), then for a round past the
    run's last (which no plan covers). Both are refused, nothing is trained or stored."""
    greedy = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy, epsilon=50.0))
    setup, strategy = _server(greedy, tmp_path / "ledger")
    node = {"max-epsilon": 8.0}
    first = handle_train(_message(setup, strategy, 1), _node(**node))
    assert first.content["status"]["refused"] and "max-epsilon=8" in str(first.content["status"]["reason"])
    assert not (tmp_path / "ledger" / "client-0.json").exists()
    late = dataclasses.replace(greedy, train=dataclasses.replace(greedy.train, rounds=1))
    setup, strategy = _server(late, tmp_path / "ledger")
    second = handle_train(_message(setup, strategy, 2), _node(**node))
    assert second.content["status"]["refused"] and "outside the run's rounds" in str(second.content["status"]["reason"])
    assert "arrays" not in second.content and not (tmp_path / "ledger" / "client-0.json").exists()


def test_a_replanned_round_never_reuses_the_noise_of_its_first_release(sgd_cfg, tmp_path: Path, flwr_identity,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Round 1 from state S, then round 1 from S' (the plan is recalibrated: a new sigma), then
    S again with the stored releases deleted (the simulation's server can delete files in its
    run directory). The third computation has the first's inputs but another sigma; had it the
    same noise and batches, sigma3*R1 - sigma1*R3 would be the noise-free clipped gradient sum."""
    import shutil

    from fedpeft.privacy.randomness import RoundRandomness

    cfg = dataclasses.replace(sgd_cfg, train=dataclasses.replace(sgd_cfg.train, rounds=2))
    keys: list[bytes] = []
    real = RoundRandomness.derived.__func__  # type: ignore[attr-defined]

    def spy(cls, secret, *inputs):  # type: ignore[no-untyped-def]
        rng = real(cls, secret, *inputs)
        keys.append(rng.noise_key)
        return rng

    monkeypatch.setattr(RoundRandomness, "derived", classmethod(spy))
    setup, strategy = _server(cfg, tmp_path / "ledger")
    handle_train(_message(setup, strategy, 1), _node())
    sigma1 = Ledger.from_json((tmp_path / "ledger" / "client-0.json").read_text()).noise_multiplier
    other = {k: v + 0.01 for k, v in setup.state.items()}
    content = RecordDict({"arrays": state_to_arrayrecord(other), "config": strategy.round_config(1)})
    handle_train(Message(content=content, dst_node_id=7, message_type="train"), _node())
    shutil.rmtree(tmp_path / "ledger" / "client-0.releases")
    handle_train(_message(setup, strategy, 1), _node())
    led = Ledger.from_json((tmp_path / "ledger" / "client-0.json").read_text())
    assert led.entries[-1].noise_multiplier != sigma1  # the plan was recalibrated in between
    assert len(keys) == 3 and len(set(keys)) == 3, "a recomputation reused an earlier release's noise"


def test_a_configuration_that_does_not_match_its_hash_is_refused(tiny_cfg, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.client import runtime
    from fedpeft.client.app import NodeRefusal

    setup, strategy = _server(tiny_cfg, tmp_path / "ledger")
    msg = _message(setup, strategy, 1)
    conf = msg.content.config_records["config"]
    conf["fedpeft-config"] = str(conf["fedpeft-config"]).replace("clip = 1.0", "clip = 100.0")
    assert "clip = 100.0" in str(conf["fedpeft-config"])
    runtime._RUNTIMES.clear()  # a fresh node process: nothing cached under that hash
    with pytest.raises(NodeRefusal, match="does not match its hash"):
        handle_train(msg, _node())
