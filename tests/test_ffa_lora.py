"""FFA-LoRA exactly: shared seeded A, frozen through DP training, B-only uploads, exact averaging."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_model import attach_method, dp_rng

from fedpeft.adapters.lora import lora_a_tensors, lora_layers
from fedpeft.client.trainer import build_loader, tensorize, train_local
from fedpeft.data.sources import train_test_split_for
from fedpeft.privacy.dpsgd import loader_sample_rate, make_private
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import task_for


def _model(cfg, method: str = "ffa_lora"):  # type: ignore[no-untyped-def]
    return attach_method(cfg, method, num_classes=2)


def test_a_is_generated_from_the_seed_and_identical_everywhere(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, m1 = _model(tiny_cfg)
    _, m2 = _model(tiny_cfg)
    assert plugin.frozen_fingerprint(m1) == plugin.frozen_fingerprint(m2)
    other = dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, seed=1))
    _, m3 = _model(other)
    assert plugin.frozen_fingerprint(m3) != plugin.frozen_fingerprint(m1)
    # B starts at zero, so the adapted model equals the base model at the start.
    assert all(float(layer.lora_B["default"].weight.detach().abs().sum()) == 0 for _, layer in lora_layers(m1))


def test_only_b_and_head_train_and_travel(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(tiny_cfg)
    state = plugin.trainable_state(model)
    assert state and all(("lora_B" in n) or ("classifier" in n) for n in state)
    assert not any("lora_A" in n for n in state)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    # PEFT's set_adapter re-enables grads unless the freeze is registered per layer.
    model.set_adapter("default")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def test_ffa_adapter_upload_is_exactly_half_of_lora(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    ffa, m_ffa = _model(tiny_cfg, "ffa_lora")
    lora, m_lora = _model(tiny_cfg, "lora")

    def adapter_bytes(state: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for n, t in state.items() if "lora_" in n)

    def head_bytes(state: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for n, t in state.items() if "lora_" not in n)

    s_ffa, s_lora = ffa.trainable_state(m_ffa), lora.trainable_state(m_lora)
    assert adapter_bytes(s_ffa) * 2 == adapter_bytes(s_lora)
    assert head_bytes(s_ffa) == head_bytes(s_lora) > 0


def test_aggregated_delta_w_equals_mean_of_client_delta_w(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(tiny_cfg)
    a = {n: t.detach().double() for n, t in lora_a_tensors(model).items()}
    scaling = tiny_cfg.adapter.alpha / tiny_cfg.adapter.rank
    rng = np.random.default_rng(0)
    template = {k: v.numpy() for k, v in plugin.trainable_state(model).items()}
    clients = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in template.items()} for _ in range(3)]
    weights = [120.0, 30.0, 50.0]
    agg = plugin.aggregate(clients, weights, {})
    w = np.asarray(weights) / sum(weights)
    for layer_name, a_mat in a.items():
        key = f"{layer_name}.lora_B.default.weight"
        dw_agg = scaling * torch.as_tensor(agg[key]).double() @ a_mat
        dw_mean = sum(wi * scaling * torch.as_tensor(c[key]).double() @ a_mat for wi, c in zip(w, clients, strict=True))
        torch.testing.assert_close(dw_agg, dw_mean, rtol=1e-6, atol=1e-6)


def _client_data(cfg, n: int = 64):  # type: ignore[no-untyped-def]
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    return pool.subset(np.arange(n))


def test_a_stays_bit_identical_and_b_trains_under_dp(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(tiny_cfg)
    before_a = {n: t.clone() for n, t in lora_a_tensors(model).items()}
    before_b = {n: t.clone() for n, t in plugin.trainable_state(model).items()}
    tok = load_tokenizer(tiny_cfg.model)
    result = train_local(model, plugin, tok, _client_data(tiny_cfg), tiny_cfg, steps=3,
                         device=torch.device("cpu"), noise_multiplier=0.8, seed=dp_rng(1))
    assert result.steps == 3 and np.isfinite(result.loss_mean)
    for n, t in lora_a_tensors(model).items():
        assert torch.equal(t, before_a[n]), f"{n} changed"
    after = plugin.trainable_state(model)
    assert any(not torch.equal(after[n], before_b[n]) for n in before_b)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def _no_dropout(model: torch.nn.Module) -> None:
    model.train()  # Opacus requires train mode; dropout off keeps passes comparable
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _plain_grads(model, plugin, batch, labels, cfg):  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    plugin.loss(model, {**batch, "labels": labels}, task_for(cfg)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _dp_applied_grads(model, plugin, cfg, data, tok, sigma, clip):  # type: ignore[no-untyped-def]
    """Gradient that Opacus's DPOptimizer applies for one fixed batch (no Poisson: batch fixed)."""
    from opacus import PrivacyEngine

    ds = tensorize(tok, data, cfg.model.max_length, task_for(cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    engine = PrivacyEngine()
    gsm, dp_opt, dp_loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=False)
    ids, mask, labels = next(iter(dp_loader))
    plugin.loss(gsm, {"input_ids": ids, "attention_mask": mask, "labels": labels}, task_for(cfg)).backward()
    dp_opt.pre_step()  # clip + noise + scale, exactly what step() applies
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {names[id(p)].replace("_module.", ""): p.grad.detach().clone() for p in dp_opt.params}
    gsm._close()
    return grads, (ids, mask, labels)


def test_dp_gradient_equals_plain_gradient_without_noise_or_clipping(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(tiny_cfg)
    tok = load_tokenizer(tiny_cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that gradients reach A's side too
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    _no_dropout(model)  # both passes must see the same function
    data = _client_data(tiny_cfg, 16)
    dp, (ids, mask, labels) = _dp_applied_grads(model, plugin, tiny_cfg, data, tok, sigma=0.0, clip=1e6)
    plain = _plain_grads(model, plugin, {"input_ids": ids, "attention_mask": mask}, labels, tiny_cfg)
    assert set(dp) == set(plain)
    for n in plain:
        torch.testing.assert_close(dp[n], plain[n], rtol=1e-4, atol=1e-6)


def test_dp_applied_gradient_norm_is_bounded_by_a_tiny_clip(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, model = _model(tiny_cfg)
    tok = load_tokenizer(tiny_cfg.model)
    _no_dropout(model)
    clip = 1e-3
    dp, _ = _dp_applied_grads(model, plugin, tiny_cfg, _client_data(tiny_cfg, 16), tok, sigma=0.0, clip=clip)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in dp.values()))
    assert float(total) <= clip * (1 + 1e-6)
    assert float(total) > 0


def test_sample_rate_used_by_opacus_is_the_calibrated_one(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """The client calibrates with 1/ceil(N/B); Opacus's loader must use the same q."""
    import math

    plugin, model = _model(tiny_cfg)
    tok = load_tokenizer(tiny_cfg.model)
    data = _client_data(tiny_cfg, 70)
    loader = build_loader(tensorize(tok, data, 24, task_for(tiny_cfg)), tiny_cfg.train.batch_size, seed=0)
    q = 1.0 / math.ceil(len(data) / min(tiny_cfg.train.batch_size, len(data)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    parts = make_private(model, opt, loader, 1.0, 1.0, RoundRandomness.derived(NodeSecret.generate(), "t"))
    assert loader_sample_rate(loader) == pytest.approx(q)
    assert parts.loader.sample_rate == pytest.approx(q)
    parts.module._close()
