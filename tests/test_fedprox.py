"""FedProx's proximal term (``train.proximal_mu``): its formula on a real local round, without
and with DP-SGD, and the claim that under DP it is added after clipping (so it is not bounded
by the clip norm) and costs nothing (``mu = 0`` is today's round, bit for bit)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_model import dp_rng
from torch import nn

from fedpeft.adapters import get
from fedpeft.client.trainer import proximal_term, train_local
from fedpeft.config import ConfigError
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.seq_cls import load_base_model

LR = 0.05


def _two_steps(tiny_cfg, mu: float, dp: bool, steps: int = 2):  # type: ignore[no-untyped-def]
    """(state before, after 1 step, after ``steps`` steps) of one client with plain SGD."""
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, optimizer="sgd", lr=LR, batch_size=16, physical_batch_size=16, proximal_mu=mu))
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, clip=1e-3))
    plugin = get(cfg.adapter.method)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data, tok = pool.subset(np.arange(48)), load_tokenizer(cfg.model)
    states = []
    for n in (0, 1, steps):
        model = plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=cfg.adapter.seed), cfg)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if n:
            train_local(model, plugin, tok, data, cfg, steps=n, device=torch.device("cpu"),
                        noise_multiplier=0.0 if dp else None, seed=dp_rng(5) if dp else 5)
        states.append({k: v.detach().clone() for k, v in plugin.trainable_state(model).items()})
    return states


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_the_proximal_gradient_is_mu_times_the_drift_from_the_round_start(tiny_cfg, dp: bool) -> None:  # type: ignore[no-untyped-def]
    """Step 1 starts at w0 (no pull); step 2 from the same w1 and the same batch differs from a
    mu = 0 run by exactly -lr * mu * (w1 - w0). Under DP the data gradient is clipped to 1e-3;
    the pull (mu * lr = 8) is far larger than anything clipped could be, so it was not clipped."""
    mu = 8.0 / LR
    w0, w1, w2_prox = _two_steps(tiny_cfg, mu, dp)
    _, w1_plain, w2_plain = _two_steps(tiny_cfg, 0.0, dp)
    assert any(float((w1[k] - w0[k]).abs().max()) > 0 for k in w0)  # step 1 moved the weights
    for k in w0:
        torch.testing.assert_close(w1[k], w1_plain[k])  # no pull at the round's start
        expected = w2_plain[k] - LR * mu * (w1[k] - w0[k])
        torch.testing.assert_close(w2_prox[k], expected, rtol=1e-4, atol=1e-7)
    if dp:  # the pull moved the weights further than any clipped (norm <= 1e-3) gradient step could
        pull = sum(float((w2_prox[k] - w2_plain[k]).norm()) ** 2 for k in w0) ** 0.5
        assert pull > LR * 1e-3


def test_mu_zero_is_todays_round_bit_for_bit(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    assert proximal_term([nn.Parameter(torch.ones(2))], 0.0) is None
    (_, _, a), (_, _, b) = _two_steps(tiny_cfg, 0.0, True), _two_steps(tiny_cfg, 0.0, True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_proximal_term_pulls_towards_the_start_even_without_a_data_gradient() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    add = proximal_term([p], 0.5)
    assert add is not None
    with torch.no_grad():
        p.add_(torch.tensor([2.0, 2.0]))  # drift (3, 0) from the start (1, -2)
    add()
    assert p.grad is not None
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_a_bad_mu_is_a_one_line_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="train.proximal_mu"):
        parse_config({"train.proximal_mu": bad})
