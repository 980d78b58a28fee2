"""FedEx-LoRA (``fedex_lora``): A and B train and travel; the server folds the residual
``mean(B_k A_k) - mean(B) mean(A)`` into the frozen weight, so the aggregate is exact.

Each test names the guarantee it checks; tests/lora_fold_helpers.py holds what FLoRA's tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fold_helpers import (
    attached,
    dp_step_matches_clipped_per_example_mean,
    effective_weights,
    federate_and_resume,
    learns_beyond_random,
    one_dp_round,
    random_global,
    reply_of,
    weighted,
)

from fedpeft.adapters.fedex_lora import residuals
from fedpeft.adapters.lora import lora_layers
from fedpeft.adapters.lora_fold import DELTA_SUFFIX, delta_key, installed_delta
from fedpeft.config import ConfigError
from fedpeft.load import parse_config
from fedpeft.server.setup import ServerSetup

METHOD = "fedex_lora"


def test_a_b_and_head_train_and_travel_up_and_the_frozen_delta_only_down(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, cfg, model = attached(tiny_cfg, METHOD)
    sent = plugin.trainable_state(model)
    layers = [n for n, _ in lora_layers(model)]
    assert set(sent) == {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"} | \
        {k for k in sent if k.startswith("base_model.model.classifier.")}
    assert any("classifier" in k for k in sent)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sent)  # every base weight (W0 + s * D) is frozen; D is not a parameter
    assert not any(n.endswith(DELTA_SUFFIX) for n, _ in model.named_parameters())
    setup = ServerSetup(cfg)
    deltas = {delta_key(n) for n in layers}
    assert set(setup.spec.tensors) == set(sent)  # what a reply must carry: no delta
    assert set(setup.state) == set(sent) | deltas  # what the server sends: the delta too
    for n, layer in lora_layers(model):
        assert setup.state[delta_key(n)].shape == tuple(layer.get_base_layer().weight.shape)
        assert setup.state[delta_key(n)].dtype == np.float32 and not setup.state[delta_key(n)].any()


def test_aggregation_is_exact_on_the_effective_weights(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """W0 + s (D_new + mean(B) mean(A)) = weighted mean of the clients' W0 + s (D_old + B_k A_k),
    with the weights AdapterAvg passes (num-examples) and a non-zero D_old."""
    plugin, _, model = attached(tiny_cfg, METHOD, rank=4, alpha=8.0)
    previous = random_global(plugin, model, seed=0)
    weights = [5.0, 3.0, 1.0]
    replies = [reply_of(random_global(plugin, model, seed=s)) for s in (1, 2, 3)]
    clients = []
    for reply in replies:
        plugin.load_state(model, {**reply, **{k: v for k, v in previous.items() if k.endswith(DELTA_SUFFIX)}})
        clients.append(effective_weights(model))
    new = plugin.aggregate(replies, weights, previous)
    assert set(new) == set(previous)
    plugin.load_state(model, new)
    got, want = effective_weights(model), weighted(clients, weights)
    for name in want:
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6 * scale)
    # not trivially so: the residual is what FedAvg of LoRA loses, and it is not small here
    res = residuals(replies, weights, new)
    assert all(np.abs(r).max() > 1e-2 for r in res.values())
    # and the mean of A and B is the plain weighted mean (AdapterAvg's)
    a_key = next(k for k in replies[0] if "lora_A" in k)
    np.testing.assert_allclose(new[a_key], weighted(replies, weights)[a_key], rtol=1e-6, atol=1e-7)


def test_the_first_release_folds_onto_a_zero_delta(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, _, model = attached(tiny_cfg, METHOD, rank=4)
    replies = [reply_of(random_global(plugin, model, seed=s)) for s in (1, 2)]
    new = plugin.aggregate(replies, [1.0, 1.0], {})  # AdapterAvg's previous before round 1
    res = residuals(replies, [1.0, 1.0], new)
    for layer, r in res.items():
        np.testing.assert_allclose(new[delta_key(layer)], r, rtol=1e-5, atol=1e-7)


def test_load_state_installs_w0_plus_scaled_delta_and_refuses_a_state_without_it(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, _, model = attached(tiny_cfg, METHOD, rank=4, alpha=8.0)
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(model)}
    state = random_global(plugin, model, seed=4)
    for _ in range(2):  # idempotent: the delta replaces the last one, it does not accumulate
        plugin.load_state(model, state)
    for n, layer in lora_layers(model):
        want = w0[n] + layer.scaling["default"] * torch.as_tensor(state[delta_key(n)])
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), want)
        assert torch.equal(installed_delta(model)[n], torch.as_tensor(state[delta_key(n)]))
    with pytest.raises(KeyError, match="frozen deltas"):
        plugin.load_state(model, reply_of(state))


def test_dp_sgd_clips_every_example_and_leaves_the_frozen_weight(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin = attached(tiny_cfg, METHOD)[0]

    def make(cfg):  # type: ignore[no-untyped-def]
        _, _, model = attached(cfg, METHOD, rank=4)
        plugin.load_state(model, random_global(plugin, model, seed=7))  # non-zero B and D: gradients reach A
        return model

    dp_step_matches_clipped_per_example_mean(tiny_cfg, plugin, make)


def test_the_adapter_alone_learns_beyond_a_random_update(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    learns_beyond_random(tiny_cfg, METHOD)


def test_refuses_server_optimisers_and_multi_task_runs(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="strategy.name.*allowed: fedavg"):
        parse_config({"model.path": str(tiny_model_dir), "adapter.method": METHOD, "strategy.name": "fedadam"})
    with pytest.raises(ConfigError, match="central"):
        parse_config({"model.path": str(tiny_model_dir), "adapter.method": METHOD, "central.mode": "server"})


def test_two_rounds_in_process_and_a_resume_restores_the_folded_residual(tiny_model_dir: Path, tmp_path: Path,
                                                                          flwr_identity) -> None:  # type: ignore[no-untyped-def]
    federate_and_resume(tiny_model_dir, tmp_path, METHOD)


def test_one_dp_sgd_round_in_process(tiny_model_dir: Path, tmp_path: Path, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    one_dp_round(tiny_model_dir, tmp_path, METHOD)
