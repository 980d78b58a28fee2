"""One DP-SGD step seen from the outside, for any adapter method (tests/test_dp_mechanism.py, the
method tests): the released update must be minus the mean of the clipped per-example gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tiny_model import clipped_mean_gradient

from fedpeft.client.trainer import train_local
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.model import load_tokenizer

__all__ = ["assert_dp_step_is_mean_clipped_gradient", "flat_trainable"]


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    """Every trainable tensor, flattened and concatenated (parameter order)."""
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def assert_dp_step_is_mean_clipped_gradient(cfg: Any, plugin: Any, fresh_model: Callable[[], torch.nn.Module],
                                            data: Any, clip: float) -> torch.nn.Module:
    """q = 1 (``cfg.train.batch_size`` = ``len(data)``), sigma = 0, SGD with ``cfg.train.lr``, one
    step of :func:`fedpeft.client.trainer.train_local`: the update of every trainable tensor
    must equal ``-lr * mean_i clip_C(g_i)``, g_i the per-example gradient over all of them
    (per-example autograd on a second copy from ``fresh_model()``; use a dropout-free model).
    A DP path that stops clipping, clips the batch instead of each example, or leaves a
    trainable tensor out of the clipping fails. Returns the trained model."""
    tok = load_tokenizer(cfg.model)
    model, reference = fresh_model(), fresh_model()
    before = flat_trainable(model)
    expected = -cfg.train.lr * clipped_mean_gradient(plugin, reference, tok, data, cfg, clip)
    result = train_local(model, plugin, tok, data, cfg, 1, torch.device("cpu"), 0.0,
                         RoundRandomness.derived(NodeSecret.generate(), "test"))
    assert result.sample_rate == 1.0
    update = flat_trainable(model) - before
    # float32 sums in another order: equal to ~1e-6 relative; unclipped or batch-clipped: O(1) off
    assert float((update - expected).norm() / expected.norm()) < 1e-3
    return model
