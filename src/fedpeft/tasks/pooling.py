"""Mean pooling for encoder classifiers (``model.pooling``).

Hugging Face's sequence-classification heads classify the first token ([CLS], through
BERT's pooler). Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to be
read by *mean pooling* over the tokens instead (their ``1_Pooling/config.json`` says so), and
that is what their features are good for: a logistic-regression probe on frozen MiniLM
features of 2,400 Rotten Tomatoes snippets reached 0.735 test accuracy with mean pooling and
0.669 with the [CLS] pooler (measured 2026-11-24). ``auto`` (default) therefore uses the
checkpoint's own pooling when it declares one and the model's standard head otherwise;
``mean`` / ``cls`` force either. Mean pooling replaces the encoder's pooler module (no
parameters) with :class:`MaskedMeanPooler`; the classifier (dropout + linear) is the model's
own, so PEFT, Opacus and export are unchanged.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from fedpeft.config import ConfigError, ModelConfig
from fedpeft.tasks.model import resolve_model_path

__all__ = ["MaskedMeanPooler", "pooling_for", "use_mean_pooling"]


class MaskedMeanPooler(nn.Module):
    """Mean of the token states under the attention mask (sentence-transformers pooling).

    It stands in for the encoder's ``pooler``, which only receives the hidden states; the
    mask is captured by :meth:`capture`, a forward pre-hook on the encoder, on every call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self._mask = mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None or mask.shape[:2] != hidden.shape[:2]:
            return hidden.mean(dim=1)
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pooling_for(cfg: ModelConfig) -> str:
    """``cls`` or ``mean``: ``model.pooling``, with ``auto`` read from the checkpoint's
    sentence-transformers ``1_Pooling/config.json`` (mean pooling only when it declares it)."""
    if cfg.pooling != "auto":
        return cfg.pooling
    conf = resolve_model_path(cfg) / "1_Pooling" / "config.json"
    try:
        declared = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if declared.get("pooling_mode_mean_tokens") else "cls"


def use_mean_pooling(model: nn.Module) -> None:
    """Swap the encoder's pooler for :class:`MaskedMeanPooler` (a BERT-style ``pooler``
    attribute is required; other architectures must use ``model.pooling=cls``)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or not hasattr(base, "pooler"):
        raise ConfigError("model.pooling", "mean", "this architecture has no BERT-style pooler; use cls")
    pooler = MaskedMeanPooler()
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.capture, with_kwargs=True)
