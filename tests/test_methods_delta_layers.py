"""NOLA, SaRA, SoKA and Sculpting Subspaces (OSFT): freezing, what travels, exact per-sample
gradients under Opacus, exact aggregation, local training with and without DP, bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from tiny_model import attach_method as _model
from tiny_model import dp_rng
from tiny_model import to_numpy as _numpy
from tiny_model import with_method as _cfg
from torch import nn

from fedpeft.adapters import get
from fedpeft.adapters.delta_linear import DeltaLinear, delta_layers
from fedpeft.adapters.nola import NolaLinear
from fedpeft.adapters.osft import OsftLinear
from fedpeft.adapters.sara import SaraLinear
from fedpeft.adapters.soka import SokaLinear, kpsvd, select_rank
from fedpeft.client.trainer import train_local
from fedpeft.config import ConfigError
from fedpeft.data.partition import client_partition
from fedpeft.data.sources import train_test_split_for
from fedpeft.strategies.adapter_avg import state_nbytes
from fedpeft.tasks.model import load_tokenizer

METHODS = ("nola", "sara", "soka", "osft")
# Direct trainable parameter names of each method's layers (besides the head).
TRAINED = {"nola": {"beta"}, "sara": {"values"}, "soka": {"kron_b"}, "osft": {"u_low", "s_low", "v_low"}}


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


@torch.no_grad()
def _delta_w(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: layer.delta_weight(layer.direct_params()).double().numpy() for n, layer in delta_layers(model)}


@pytest.mark.parametrize("method", METHODS)
def test_attach_freezes_all_but_adapter_and_head(tiny_cfg, method: str) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(_cfg(tiny_cfg, method))
    layers = delta_layers(model)
    assert len(layers) == 4  # query + value in 2 layers of the tiny BERT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{ln}.{p}" for ln, _ in layers for p in TRAINED[method]}
    expected |= {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert trainable == expected
    assert set(plugin.trainable_state(model)) == expected
    for _, layer in layers:  # the model starts exactly at W0
        assert float(layer.delta_weight(layer.direct_params()).detach().abs().max()) < 1e-5
    # Frozen parts are a deterministic function of W0 / the seed: a second attach agrees.
    _, again = _model(_cfg(tiny_cfg, method))
    assert plugin.frozen_fingerprint(model) == plugin.frozen_fingerprint(again) != ""


def test_nola_seed_changes_fingerprint_and_train_a_variant(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(_cfg(tiny_cfg, "nola", num_basis=16))
    other = dataclasses.replace(tiny_cfg.adapter, method="nola", seed=1, options=(("num_basis", 16),))
    _, model2 = _model(dataclasses.replace(tiny_cfg, adapter=other))
    assert plugin.frozen_fingerprint(model) != plugin.frozen_fingerprint(model2)
    _, full = _model(_cfg(tiny_cfg, "nola", num_basis=16, train_a="true"))
    assert {n.rsplit(".", 1)[-1] for n in plugin.trainable_state(full)} >= {"alpha", "beta"}


@pytest.mark.parametrize("bad", [("nola", "num_basis", "0"), ("sara", "fraction", "2"), ("soka", "energy", "x"),
                                 ("osft", "keep", "1.5"), ("osft", "rank_pattern", "1")])
def test_bad_options_are_one_line_config_errors(tiny_cfg, bad) -> None:  # type: ignore[no-untyped-def]
    method, key, value = bad
    with pytest.raises(ConfigError, match=f"adapter.options.{key}"):
        get(method).validate_config(_cfg(tiny_cfg, method, **{key: value}))


def _layer(kind: str) -> DeltaLinear:
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    layer: DeltaLinear = {
        "nola": lambda: NolaLinear(base, rank=3, num_basis=5, scale=1.0, seed=3, train_a=True),
        "sara": lambda: SaraLinear(base, fraction=0.25),
        "soka": lambda: SokaLinear(base, energy=0.99, cap=4),
        "osft": lambda: OsftLinear(base, keep=0.5),
    }[kind]()
    with torch.no_grad():  # move away from the zero-delta start so every path is exercised
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("method", METHODS)
def test_grad_sampler_equals_per_example_autograd(method: str) -> None:
    """The registered Opacus grad sampler gives exactly each example's own gradient."""
    layer = _layer(method)
    x = torch.randn(5, 4, 12)
    gsm = GradSampleModule(layer, loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    per_sample = {n: p.grad_sample.clone() for n, p in trainable.items()}
    gsm._close()  # remove the hooks before the reference computation
    for i in range(x.shape[0]):
        grads = torch.autograd.grad((layer(x[i : i + 1]) ** 2).sum(), list(trainable.values()))
        for name, g in zip(trainable, grads, strict=True):
            torch.testing.assert_close(per_sample[name][i], g, rtol=1e-4, atol=1e-5, msg=f"{method}.{name}")


def test_soka_kpsvd_reconstructs_and_rank_selection() -> None:
    w = torch.randn(6, 8, dtype=torch.float64)
    u, s, v = kpsvd(w, (2, 3), (2, 4))
    rebuilt = sum(s[k] * torch.kron(u[k], v[k]) for k in range(s.numel()))
    torch.testing.assert_close(rebuilt, w)
    assert select_rank(torch.tensor([10.0, 1e-3, 1e-4, 1e-5]), 0.9, 8) == 1
    assert select_rank(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), 1.0, 2) <= 2


@pytest.mark.parametrize("method", METHODS)
def test_aggregation_is_exact_on_the_weight_update(tiny_cfg, method: str) -> None:  # type: ignore[no-untyped-def]
    """The aggregated global state's dW equals the weighted mean of the clients' dW."""
    plugin, model = _model(_cfg(tiny_cfg, method))
    base = _numpy(plugin.trainable_state(model))
    gen = np.random.default_rng(0)
    states, deltas = [], []
    for _ in range(3):
        state = {k: (v + 0.05 * gen.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
        plugin.load_state(model, state)
        states.append(_numpy(plugin.trainable_state(model)))  # what a client would send
        deltas.append(_delta_w(model))
    weights = [10.0, 30.0, 60.0]
    merged = plugin.server_step(1, plugin.aggregate(states, weights, base), tiny_cfg)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    plugin.load_state(model, merged)
    got = _delta_w(model)
    w = np.asarray(weights) / sum(weights)
    for name in got:
        want = sum(wk * d[name] for wk, d in zip(w, deltas, strict=True))
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))
    head = [k for k in base if k.startswith("classifier.")]
    for k in head:
        np.testing.assert_allclose(merged[k], sum(wk * s[k] for wk, s in zip(w, states, strict=True)), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dp", [False, True], ids=["nodp", "dp"])
def test_train_local_with_and_without_dp(tiny_cfg, method: str, dp: bool) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_cfg, method)
    plugin, model = _model(cfg)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = client_partition(pool, cfg.data, cfg.train.clients, 0, cfg.seed)
    frozen = _frozen(model)
    before = _numpy(plugin.trainable_state(model))
    result = train_local(model, plugin, load_tokenizer(cfg.model), data, cfg, steps=2, device=torch.device("cpu"),
                         noise_multiplier=1.0 if dp else None, seed=dp_rng(1) if dp else 1)
    assert np.isfinite(result.loss_first) and np.isfinite(result.loss_last) and result.steps == 2
    for name, tensor in _frozen(model).items():  # bit-identical frozen parts after (DP) steps
        assert torch.equal(tensor, frozen[name]), name
    after = _numpy(plugin.trainable_state(model))
    adapter_keys = [k for k in after if not k.startswith("classifier.")]
    assert any(not np.array_equal(after[k], before[k]) for k in adapter_keys)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_bytes_per_round_relative_to_ffa_lora(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """Upload size per client and round, by construction of each method (tiny BERT: 4 layers 32x32)."""
    ffa_plugin, ffa = _model(_cfg(tiny_cfg, "ffa_lora"))
    ffa_bytes = state_nbytes(_numpy(ffa_plugin.trainable_state(ffa)))
    head = 2 * 32 * 4 + 2 * 4  # classifier weight + bias, float32
    r = tiny_cfg.adapter.rank
    assert ffa_bytes == head + 4 * 32 * r * 4
    sizes, models = {}, {}
    for method in METHODS:
        plugin, models[method] = _model(_cfg(tiny_cfg, method))
        sizes[method] = state_nbytes(_numpy(plugin.trainable_state(models[method])))
    assert sizes["nola"] == head + 4 * 256 * 4
    assert sizes["sara"] == head + 4 * round(0.02 * 32 * 32) * 4
    assert sizes["osft"] == head + 4 * 16 * (32 + 32 + 1) * 4  # keep 50 %: 16 low directions
    soka_rank = sum(layer.rank for _, layer in delta_layers(models["soka"]))
    assert sizes["soka"] == head + soka_rank * 8 * 8 * 4  # factorization(32) = (4, 8): each B_k is 8x8
    print({m: f"{s / ffa_bytes:.2f}x FFA-LoRA" for m, s in sizes.items()})


def test_export_writes_safetensors_and_config(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.numpy import load_file

    plugin, model = _model(_cfg(tiny_cfg, "sara"))
    plugin.export(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(plugin.trainable_state(model))
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == "sara" and meta["frozen_fingerprint"] == plugin.frozen_fingerprint(model)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_flower_simulation_two_rounds(tiny_cfg, tmp_path: Path, method: str) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.sim.simulate import simulate

    cfg = _cfg(tiny_cfg, method)
    path, _ = simulate(cfg, tmp_path / f"run-{method}")
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["method"] == method and row["clients_accepted"] == 3 and not row["rejected"]
        assert row["bytes_up"] > 0 and 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["loss"])
        assert row["train_loss"] is None  # a DP reply carries no training loss (issue 16): the server's own loss
        assert 0 < row["epsilon"] <= cfg.privacy.epsilon
    assert (path / "adapter" / "adapter_model.safetensors").is_file() or any((path / "adapter").iterdir())


@pytest.mark.parametrize("make", [lambda lin: SokaLinear(lin, 0.9, 16), lambda lin: OsftLinear(lin, 0.5)],
                         ids=["soka", "osft"])
def test_w0_decompositions_are_bit_identical_at_any_thread_count(make) -> None:  # type: ignore[no-untyped-def]
    """The server (2 torch threads) and a Ray actor (1 thread) must derive the same frozen bits
    from W0, or the frozen-tensor hash check rejects every client (it did on MiniLM's 384 x 384)."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 384)
    threads = torch.get_num_threads()
    frozen = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            layer = make(lin)  # frozen W0-derived tensors and the trainable values they initialise
            frozen.append({k: v.detach().clone() for k, v in layer.direct_params().items()})
    finally:
        torch.set_num_threads(threads)
    assert frozen[0] and all(set(f) == set(frozen[0]) for f in frozen)
    assert all(torch.equal(f[k], frozen[0][k]) for f in frozen[1:] for k in f)
