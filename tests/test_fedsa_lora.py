"""FedSA-LoRA (``fedsa_lora``): A and the head travel and average, B stays on the client.

What each test guards: the exact set of tensors a reply carries (never a ``lora_B``) and that
the server rejects a reply carrying B; what trains (A, B, head); the client-kept B (reset for a
fresh client, restored per client, kept between rounds, and found again on the node's disk
after a resume, where the resumed round is then a replay, not a second charge); that averaging
A is exact for every client's own B; that under DP-SGD one step is minus the mean of the
per-example gradients clipped over A, B and the head together; that the adapter alone learns
beyond a random update of the same norm.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_step import assert_dp_step_is_mean_clipped_gradient
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from inprocess_grid import LocalGrid
from lora_helpers import assert_mean_dw, delta_w, dp_simulation, method_cfg, method_model, numpy_state
from tiny_model import adapter_alone_lowers_loss

from fedpeft.adapters import get
from fedpeft.adapters.fedsa_lora import FedSaLoraPlugin, is_local_b
from fedpeft.adapters.lora import lora_layers
from fedpeft.client import app as client_app
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.server.loop import RoundHook, run_federation
from fedpeft.strategies.adapter_avg import state_to_arrayrecord
from fedpeft.strategies.validation import Rejected, StateSpec, validate_reply


def _cfg(tiny_cfg, **train: Any):  # type: ignore[no-untyped-def]
    return method_cfg(tiny_cfg, "fedsa_lora", **train)


def _random_b(model, seed: int, std: float = 0.1) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    gen = np.random.default_rng(seed)
    return {n: gen.normal(0, std, p.shape).astype(np.float32) for n, p in model.named_parameters() if is_local_b(n)}


def test_a_and_head_travel_b_stays_all_three_train(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = method_model(_cfg(tiny_cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    a = {n for n in trainable if ".lora_A." in n}
    b = {n for n in trainable if ".lora_B." in n}
    head = trainable - a - b
    assert a and b and head and all("classifier" in n for n in head)
    assert len(a) == len(b) == len(lora_layers(model))
    assert set(plugin.trainable_state(model)) == a | head, "a reply is exactly every lora_A + the head"
    assert set(plugin.local_state(model)) == b, "the local state is exactly every lora_B"
    assert plugin.frozen_fingerprint(model) == "", "A trains: no frozen-tensor hash"
    # the server's reply spec is the global state's: a reply that carries a B is rejected
    state = numpy_state(plugin.trainable_state(model))
    spec = StateSpec.from_state(state)
    extra = {**state, sorted(b)[0]: plugin.local_state(model)[sorted(b)[0]]}
    content = RecordDict({"arrays": state_to_arrayrecord(extra), "metrics": MetricRecord({"num-examples": 10})})
    with pytest.raises(Rejected, match="unexpected"):
        validate_reply(content, spec)
    validate_reply(RecordDict({"arrays": state_to_arrayrecord(state), "metrics": MetricRecord({"num-examples": 10})}),
                   spec)


def test_local_b_is_reset_for_a_fresh_client_and_restored(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = method_model(_cfg(tiny_cfg))
    mine = _random_b(model, 0)
    plugin.load_local_state(model, mine)
    got = plugin.local_state(model)
    assert all(np.array_equal(got[k], mine[k]) for k in mine)
    plugin.load_state(model, numpy_state(plugin.trainable_state(model)))  # the global state leaves B alone
    assert all(np.array_equal(plugin.local_state(model)[k], mine[k]) for k in mine)
    plugin.load_local_state(model, {})
    assert all(not v.any() for v in plugin.local_state(model).values()), "a fresh client starts with B = 0"
    with pytest.raises(KeyError, match="unknown local tensor"):
        plugin.load_local_state(model, {**mine, "nope.lora_B.default.weight": mine[sorted(mine)[0]]})
    with pytest.raises(KeyError, match="lacks"):
        plugin.load_local_state(model, dict(list(mine.items())[1:]))


def test_averaging_a_is_exact_for_every_clients_own_b(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """The aggregate is the weighted mean of A (and head), and for each client's own B_k the
    update with the mean A equals the weighted mean of its updates with every client's A."""
    plugin, model = method_model(_cfg(tiny_cfg))
    base = numpy_state(plugin.trainable_state(model))
    rng = np.random.default_rng(0)
    states = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in base.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    w = np.asarray(weights) / sum(weights)
    agg = plugin.aggregate(states, weights, {})
    assert set(agg) == set(base)
    for k in agg:
        np.testing.assert_allclose(agg[k], sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states, strict=True)),
                                   rtol=1e-6, atol=1e-7)
    for client in range(3):
        plugin.load_local_state(model, _random_b(model, 10 + client))
        deltas = []
        for s in states:
            plugin.load_state(model, s)
            deltas.append(delta_w(model))
        plugin.load_state(model, agg)
        assert_mean_dw(delta_w(model), deltas, weights)


def test_dp_step_clips_each_example_over_a_b_and_head(tiny_cfg, still_model_dir) -> None:  # type: ignore[no-untyped-def]
    n, clip = 12, 1e-3
    cfg = _cfg(tiny_cfg, optimizer="sgd", lr=1.0, local_steps=1, batch_size=n, physical_batch_size=16)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(still_model_dir)),
                              privacy=dataclasses.replace(cfg.privacy, clip=clip))
    plugin = get("fedsa_lora")

    def fresh() -> torch.nn.Module:  # a non-zero B: every trainable tensor (A too) has a gradient
        _, model = method_model(cfg)
        plugin.load_local_state(model, _random_b(model, 1))
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= set(plugin.local_state(model))
        return model

    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    assert_dp_step_is_mean_clipped_gradient(cfg, plugin, fresh, pool.subset(list(range(n))), clip)


def test_adapter_alone_learns_beyond_a_random_update(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_cfg, batch_size=32, physical_batch_size=32, lr=3e-2)
    plugin, model = method_model(cfg)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    adapter_alone_lowers_loss(model, plugin, cfg, pool.subset(np.arange(32)), steps=20)


class _Crash(RoundHook):
    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        if server_round == 2:
            raise RuntimeError("server lost")


def test_federation_keeps_b_on_each_client_across_rounds_and_a_resume(tiny_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """A DP run of 3 rounds, 2 clients, the server lost at the end of round 2 and resumed with
    fresh client processes: every reply is A + head; round 2 and 3 start from the client's
    own B of its previous round; the resumed round 2 finds round 1's B on the node's disk, so
    it is the same computation and is replayed (one ledger entry per round), and round 3
    continues from the B of round 2 (restored with the replay)."""
    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 16, "data.examples_per_client": 16,
        "data.test_size": 16, "train.clients": 2, "train.rounds": 3, "train.batch_size": 16, "train.local_steps": 2,
        "train.lr": 0.05, "privacy.epsilon": 8.0, "adapter.method": "fedsa_lora", "output_dir": str(tmp_path),
    })
    seen: list[dict[str, np.ndarray]] = []  # the B each training round started from, in call order
    kept: list[dict[str, np.ndarray]] = []  # the B each training round ended with
    load, local = FedSaLoraPlugin.load_local_state, FedSaLoraPlugin.local_state

    def spy_load(self, model, state):  # type: ignore[no-untyped-def]
        seen.append({k: np.array(v, copy=True) for k, v in state.items()})
        load(self, model, state)

    def spy_local(self, model):  # type: ignore[no-untyped-def]
        out = local(self, model)
        kept.append({k: v.copy() for k, v in out.items()})
        return out

    monkeypatch.setattr(FedSaLoraPlugin, "load_local_state", spy_load)
    monkeypatch.setattr(FedSaLoraPlugin, "local_state", spy_local)
    replies: list[set[str]] = []

    def app(msg, context):  # type: ignore[no-untyped-def]
        reply = client_app.app(msg, context)
        replies.extend(set(r.keys()) for r in reply.content.values() if isinstance(r, ArrayRecord))
        return reply

    with pytest.raises(RuntimeError, match="server lost"):
        run_federation(LocalGrid(2, app=app), cfg, tmp_path, hooks=[_Crash()])  # type: ignore[arg-type]
    assert len(seen) == 4 and seen[0] == {} and seen[1] == {}, "fresh clients start with B = 0"
    for client in (0, 1):  # client order within a round is the node order
        assert set(seen[2 + client]) == set(kept[client]) and any(v.any() for v in kept[client].values())
        assert all(np.array_equal(seen[2 + client][k], kept[client][k]) for k in kept[client]), \
            "round 2 starts from the client's own B after round 1"
    assert any(not np.array_equal(kept[0][k], kept[1][k]) for k in kept[0]), "each client has its own B"
    round2 = kept[2:4]
    seen.clear()
    kept.clear()
    rows = run_federation(LocalGrid(2, app=app), cfg, tmp_path, resume=True)  # type: ignore[arg-type]
    assert [r["round"] for r in rows] == [1, 2, 3]
    ledgers = [json.loads(p.read_text()) for p in sorted((tmp_path / "ledger").glob("client-*.json"))]
    assert len(ledgers) == 2
    for ledger in ledgers:
        assert [e["round"] for e in ledger["entries"]] == [1, 2, 3], "the resumed round 2 is replayed, not recharged"
    assert len(seen) == 2, "only round 3 trains after the resume"
    for client in (0, 1):
        assert all(np.array_equal(seen[client][k], round2[client][k]) for k in round2[client]), \
            "round 3 starts from the client's B of round 2"
    names = set(get("fedsa_lora").trainable_state(method_model(cfg)[1]))
    assert replies and all(r == names for r in replies), "every reply is exactly A + head, never a B"
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_real_flower_simulation_with_dp(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = dp_simulation(_cfg(tiny_cfg), tmp_path)
    assert list((path / "ledger").glob("client-*.local/*/round-2.npz")), "each client kept its B on its disk"
