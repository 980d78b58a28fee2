"""One DP-SGD step seen from the outside, for any adapter method (tests/test_dp_mechanism.py, the
method tests): the released update must be minus the mean of the clipped per-example gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedpeft.client.trainer import tensorize, train_local
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import task_for

__all__ = ["assert_dp_step_is_mean_clipped_gradient", "flat_trainable"]


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    """Every trainable tensor, flattened and concatenated (parameter order)."""
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def assert_dp_step_is_mean_clipped_gradient(cfg: Any, plugin: Any, fresh_model: Callable[[], torch.nn.Module],
                                            data: Any, clip: float) -> None:
    """q = 1 (``cfg.train.batch_size`` = ``len(data)``), sigma = 0, SGD with ``cfg.train.lr``, one
    step of :func:`fedpeft.client.trainer.train_local`: the update of every trainable tensor
    must equal ``-lr * mean_i clip_C(g_i)``, g_i the per-example gradient over all of them
    (per-example autograd on a second copy from ``fresh_model()``; use a dropout-free model).
    A DP path that stops clipping, clips the batch instead of each example, or leaves a
    trainable tensor out of the clipping fails."""
    tok, task_type = load_tokenizer(cfg.model), task_for(cfg)
    model, reference = fresh_model(), fresh_model()
    before = flat_trainable(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    ds = tensorize(tok, data, cfg.model.max_length, task_type)
    clipped = []
    for i in range(len(data)):
        ids, mask, label = ds[i]
        width = int(mask.sum())
        loss = plugin.loss(reference, {"input_ids": ids[None, :width], "attention_mask": mask[None, :width],
                                       "labels": label[None]}, task_type)
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        assert float(g.norm()) > 10 * clip  # every example is really clipped
        clipped.append(g * min(1.0, clip / float(g.norm())))
    expected = -cfg.train.lr * torch.stack(clipped).mean(0)
    result = train_local(model, plugin, tok, data, cfg, 1, torch.device("cpu"), 0.0,
                         RoundRandomness.derived(NodeSecret.generate(), "test"))
    assert result.sample_rate == 1.0
    update = flat_trainable(model) - before
    # float32 sums in another order: equal to ~1e-6 relative; unclipped or batch-clipped: O(1) off
    assert float((update - expected).norm() / expected.norm()) < 1e-3
