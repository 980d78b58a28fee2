"""RoLoRA (``rolora``): odd rounds train and send B (A frozen), even rounds A (B frozen).

What each test guards: which factor trains in which round and the exact tensors a reply
carries; that the server's global state holds both factors and the round count and that it
checks a reply against its phase's shape; that the averaged factor gives exactly the
weighted mean of the clients' dW in both phases, and that a factor of the wrong phase is
ignored; that under DP-SGD one step is minus the mean of the per-example gradients clipped
over the phase's factor and the head; that each phase's factor alone learns beyond a random
update of the same norm; that an in-process federation alternates for three rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_step import assert_dp_step_is_mean_clipped_gradient
from flwr.app import ArrayRecord
from inprocess_grid import LocalGrid
from lora_helpers import assert_mean_dw, delta_w, dp_simulation, method_cfg, method_model, numpy_state
from tiny_model import adapter_alone_lowers_loss

from fedpeft.adapters import get
from fedpeft.adapters.rolora import ROUND_KEY
from fedpeft.client import app as client_app
from fedpeft.config import ConfigError
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.server.loop import RoundHook, run_federation
from fedpeft.server.setup import ServerSetup
from fedpeft.strategies.multitask_avg import MultiTaskSpec


def _cfg(tiny_cfg, **train: Any):  # type: ignore[no-untyped-def]
    return method_cfg(tiny_cfg, "rolora", **train)


def _names(model, factor: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {n for n, _ in model.named_parameters() if f".lora_{factor}." in n}


def _with_random_b(plugin, model, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Give every B a random value (A's gradient is zero while B is)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_phases_alternate_what_trains_and_what_a_reply_carries(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = method_model(_cfg(tiny_cfg))
    a, b = _names(model, "A"), _names(model, "B")
    head = {n for n, p in model.named_parameters() if p.requires_grad} - a - b
    assert a and b and head and all("classifier" in n for n in head)
    full = {k: v.detach().cpu().numpy() for k, v in plugin._shared(model).items()}
    assert set(full) == a | b | head
    for done, trains in ((0, b), (1, a), (2, b), (3, a)):
        plugin.load_state(model, {**full, ROUND_KEY: np.asarray([float(done)], dtype=np.float32)})
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == trains | head, f"after {done} rounds"
        assert set(plugin.trainable_state(model)) == trains | head
    variants = plugin.reply_variants(model)
    assert {k: set(v) for k, v in variants.items()} == {"": b | head, "@A": a | head}


def test_server_holds_both_factors_and_checks_each_phase(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    setup = ServerSetup(_cfg(tiny_cfg))
    plugin, model = setup.plugin, setup.model
    a, b = _names(model, "A"), _names(model, "B")
    assert a <= set(setup.state) and b <= set(setup.state) and setup.state[ROUND_KEY].tolist() == [0.0]
    assert isinstance(setup.spec, MultiTaskSpec)
    assert {k: set(v.tensors) for k, v in setup.spec.task_specs.items()} == \
        {k: set(v) for k, v in plugin.reply_variants(model).items()}
    assert plugin.server_step(4, dict(setup.state), setup.cfg)[ROUND_KEY].tolist() == [4.0]
    with pytest.raises(ConfigError, match="fedavg only"):
        parse_config({"model.path": tiny_cfg.model.path, "adapter.method": "rolora", "strategy.name": "fedadam"})


@pytest.mark.parametrize("done", [0, 1])
def test_averaged_factor_gives_exactly_the_mean_client_delta_w(tiny_cfg, done: int) -> None:  # type: ignore[no-untyped-def]
    """Phase B (done = 0) and phase A (done = 1): the aggregate's dW is the weighted mean of the
    clients' dW; the other factor keeps its global value, and a reply of the other phase is
    left out (its head too)."""
    plugin, model = method_model(_cfg(tiny_cfg))
    _with_random_b(plugin, model)
    current = {**numpy_state(plugin._shared(model)), ROUND_KEY: np.asarray([float(done)], dtype=np.float32)}
    plugin.load_state(model, current)
    trains, other = ("B", "A") if done == 0 else ("A", "B")
    rng = np.random.default_rng(0)
    replies = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in current.items()
                if k != ROUND_KEY and f".lora_{other}." not in k} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    deltas = []
    for s in replies:  # each client's model: its trained factor, the other one as sent out
        plugin.load_state(model, {**current, **s})
        deltas.append(delta_w(model))
    wrong = {k: (v + 1.0).astype(v.dtype) for k, v in current.items() if k != ROUND_KEY and f".lora_{trains}." not in k}
    agg = plugin.aggregate_multitask([*replies, wrong], [*weights, 100.0], {}, current)
    assert all(np.array_equal(agg[k], current[k]) for k in current if f".lora_{other}." in k), "other factor kept"
    heads = [k for k in current if k != ROUND_KEY and ".lora_" not in k]
    for k in heads:  # the head: the mean of the phase's replies only
        np.testing.assert_allclose(agg[k], sum(w * s[k].astype(np.float64) for w, s in zip(weights, replies,
                                                                                          strict=True)) / 8.0,
                                   rtol=1e-5, atol=1e-6)
    plugin.load_state(model, agg)
    assert_mean_dw(delta_w(model), deltas, weights)


@pytest.mark.parametrize("done", [0, 1])
def test_dp_step_clips_each_example_over_the_phase_factor_and_head(tiny_cfg, still_model_dir, done: int) -> None:  # type: ignore[no-untyped-def]
    n, clip = 12, 1e-3
    cfg = _cfg(tiny_cfg, optimizer="sgd", lr=1.0, local_steps=1, batch_size=n, physical_batch_size=16)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(still_model_dir)),
                              privacy=dataclasses.replace(cfg.privacy, clip=clip))
    plugin = get("rolora")

    def fresh() -> torch.nn.Module:
        _, model = method_model(cfg)
        _with_random_b(plugin, model)
        plugin.set_phase(model, done)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable & _names(model, "B" if done == 0 else "A") and not trainable & _names(
            model, "A" if done == 0 else "B")
        return model

    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    assert_dp_step_is_mean_clipped_gradient(cfg, plugin, fresh, pool.subset(list(range(n))), clip)


@pytest.mark.parametrize("done", [0, 1])
def test_each_phase_learns_beyond_a_random_update(tiny_cfg, done: int) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_cfg, batch_size=32, physical_batch_size=32, lr=3e-2)
    plugin, model = method_model(cfg)
    if done:
        _with_random_b(plugin, model)
    plugin.set_phase(model, done)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    adapter_alone_lowers_loss(model, plugin, cfg, pool.subset(np.arange(32)), steps=20)


class _States(RoundHook):
    """The global state after each round."""

    def __init__(self) -> None:
        self.states: list[dict[str, np.ndarray]] = []
        self.setup: Any = None

    def on_start(self, setup: Any, strategy: Any, run_dir: Any) -> None:
        self.setup = setup
        self.states.append({k: v.copy() for k, v in setup.state.items()})

    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        self.states.append({k: v.copy() for k, v in self.setup.state.items()})


def test_federation_alternates_b_and_a_rounds(tiny_model_dir: Path, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 16, "data.examples_per_client": 16,
        "data.test_size": 16, "train.clients": 2, "train.rounds": 3, "train.batch_size": 16, "train.local_steps": 1,
        "train.lr": 0.05, "privacy.epsilon": 8.0, "adapter.method": "rolora", "output_dir": str(tmp_path),
    })
    replies: list[set[str]] = []

    def app(msg, context):  # type: ignore[no-untyped-def]
        reply = client_app.app(msg, context)
        replies.extend(set(r.keys()) for r in reply.content.values() if isinstance(r, ArrayRecord))
        return reply

    hook = _States()
    rows = run_federation(LocalGrid(2, app=app), cfg, tmp_path, hooks=[hook])  # type: ignore[arg-type]
    assert [r["clients_accepted"] for r in rows] == [2, 2, 2] and not any(r["rejected"] for r in rows)
    model = hook.setup.model
    a, b = _names(model, "A"), _names(model, "B")
    head = set(replies[0]) - a - b
    assert head and [r - head for r in replies] == [b, b, a, a, b, b], "B in rounds 1 and 3, A in round 2"
    states = hook.states
    for server_round, trained in ((1, b), (2, a), (3, b)):
        before, after = states[server_round - 1], states[server_round]
        assert after[ROUND_KEY].tolist() == [float(server_round)]
        assert all(np.array_equal(before[k], after[k]) for k in (a | b) - trained), f"round {server_round}: frozen"
        assert any(not np.array_equal(before[k], after[k]) for k in trained), f"round {server_round}: trained"


@pytest.mark.slow
def test_real_flower_simulation_with_dp(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = dp_simulation(_cfg(tiny_cfg), tmp_path)
    assert (path / "adapter").exists()
