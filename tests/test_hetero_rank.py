"""Heterogeneous-rank FFA-LoRA: clients with r_i < R train B[:, :r_i] against A[:r_i];
the server's zero-padded weighted mean gives exactly the weighted mean of the clients' dW."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.adapters import get
from fedpeft.adapters.base import weighted_mean
from fedpeft.adapters.ffa_lora_hetero import pad_state
from fedpeft.adapters.lora import lora_layers


@pytest.fixture()
def hetero_model(tiny_model_dir):  # type: ignore[no-untyped-def]
    from fedpeft.load import parse_config
    from fedpeft.tasks.seq_cls import load_base_model

    cfg = parse_config({"model.path": str(tiny_model_dir), "adapter.method": "ffa_lora_hetero", "adapter.rank": 8,
                        "adapter.alpha": 16.0})
    plugin = get("ffa_lora_hetero")
    return plugin, plugin.attach(load_base_model(cfg.model, 2, head_seed=0), cfg)


def _delta_weights(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Every adapted layer's dW as PEFT computes it (scale * B @ A)."""
    return {n: layer.get_delta_weight("default").detach().double().numpy() for n, layer in lora_layers(model)}


def test_client_state_has_ri_columns_and_fingerprint_is_stable(hetero_model) -> None:  # type: ignore[no-untyped-def]
    plugin, model = hetero_model
    full = {k: tuple(v.shape) for k, v in plugin.trainable_state(model).items()}
    fp = plugin.frozen_fingerprint(model)
    plugin.set_client_rank(model, 3)
    state = plugin.trainable_state(model)
    for k, v in state.items():
        assert v.shape == ((full[k][0], 3) if "lora_B" in k else full[k]), k
    assert not any("lora_A" in k for k in state)
    assert plugin.frozen_fingerprint(model) == fp  # the hash covers the full shared A, whatever the rank
    a = next(layer.lora_A["default"].weight for _, layer in lora_layers(model))
    assert torch.count_nonzero(a[3:]) == 0 and torch.count_nonzero(a[:3]) == a[:3].numel()
    with pytest.raises(ValueError, match="outside"):
        plugin.set_client_rank(model, 9)


def test_zero_padded_average_equals_weighted_mean_of_client_updates(hetero_model) -> None:  # type: ignore[no-untyped-def]
    plugin, model = hetero_model
    full_state = {k: v.numpy().copy() for k, v in plugin.trainable_state(model).items()}
    shapes = {k: v.shape for k, v in full_state.items()}
    rng = np.random.default_rng(1)
    ranks, weights = [8, 4, 2, 1], [5.0, 3.0, 1.0, 7.0]
    replies, client_dw = [], []
    for r in ranks:
        global_state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in full_state.items()}
        plugin.load_state(model, global_state)
        plugin.set_client_rank(model, r)
        with torch.no_grad():  # "training": the client's B (r columns) takes new values
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight[:, :r] = torch.as_tensor(rng.normal(size=(layer.lora_B["default"].weight.shape[0], r)))
        client_dw.append(_delta_weights(model))  # the update this client's model really applies
        replies.append({k: v.numpy().copy() for k, v in plugin.trainable_state(model).items()})
    padded = [pad_state(s, shapes) for s in replies]
    assert all(v.shape == shapes[k] for s in padded for k, v in s.items())
    agg = plugin.aggregate(padded, weights, {})
    plugin.load_state(model, agg)
    got = _delta_weights(model)
    w = np.asarray(weights) / sum(weights)
    for name in got:
        want = sum(wi * dw[name] for wi, dw in zip(w, client_dw, strict=True))
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # the head (not rank-dependent) is the plain weighted mean
    head = [k for k in agg if "lora_B" not in k]
    assert head
    ref = weighted_mean([{k: s[k] for k in head} for s in padded], weights)
    for k in head:
        np.testing.assert_array_equal(agg[k], ref[k])


def test_pad_state_leaves_wrong_shapes_for_validation() -> None:
    full = {"x.lora_B.default.weight": (4, 8)}
    wider = {"x.lora_B.default.weight": np.ones((4, 9), np.float32)}
    taller = {"x.lora_B.default.weight": np.ones((5, 2), np.float32)}
    assert pad_state(wider, full)["x.lora_B.default.weight"].shape == (4, 9)
    assert pad_state(taller, full)["x.lora_B.default.weight"].shape == (5, 2)
    narrow = pad_state({"x.lora_B.default.weight": np.ones((4, 3), np.float32)}, full)["x.lora_B.default.weight"]
    assert narrow.shape == (4, 8) and narrow[:, :3].sum() == 12 and not narrow[:, 3:].any()
