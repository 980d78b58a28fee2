"""TriAdaptLoRA, federated: a triangular rank-adaptation core that grows, decided by the server.

Paper: Yao Liang, Yuwei Wang, Yi Zeng, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive
Low-Rank Adaptation for Parameter-Efficient Fine-Tuning", arXiv:2501.08008 (2025).

Method as implemented. Each target linear layer (``adapter.target_modules``) gets
``dW = s * B @ T @ A`` with A (r x d_in) and B (d_out x r) frozen, generated from the adapter
seed (identical on every process, hash-checked each round like FFA-LoRA's A) and a trainable
square *rank-adaptation matrix* T (r x r, r = ``adapter.rank`` = the maximum rank), initialised
to zero. T is split triangularly, T = L + U (L lower-triangular with the diagonal, U strictly
upper). Only the leading k x k block of T is active (k = the layer's current rank, a 0/1
``rank_mask`` of length r); growing k -> k+1 activates row k of L and column k of U -- the
new triangular blocks -- which start at zero, so growth never changes the model's function.
Importance of a layer is the normalised Frobenius norm of its active triangles,
``|L_k|_F / sqrt(k(k+1)/2) + |U_k|_F / sqrt(k(k-1)/2)``. Growth follows a linear schedule
of the total rank budget (``init_rank`` per layer after round 0 up to ``rank`` per layer at the
last round, the paper's linear threshold); each round the budget increase goes, one rank at
a time, to the layers with the highest importance that still have room.

Federation. Tensor shapes are fixed at the maximum rank, so every reply has the same shapes
and the reply validator stays unchanged. The SERVER decides growth (``server_step``) from the
importance of the *aggregated* T -- a post-processing of DP outputs, so it costs no privacy and
needs no extra upload -- and broadcasts the masks inside the global state. Clients never send
a mask back (a reply holding one is rejected as unexpected); a broadcast without masks (round
1) means the initial rank ``init_rank`` for every layer.
What travels: up -- every masked T (r x r per layer, inactive entries zero) + the classifier
head; down -- the same plus the rank masks (r floats per layer).
Averaging: exact. dW = s * B @ T @ A is linear in T with A and B shared, so
s * B @ mean_k(T_k) @ A == mean_k(s * B @ T_k @ A); inactive entries are zero on every client.
DP: yes. T is an ``nn.Linear`` whose input and output are masked, so Opacus's per-sample
gradient is exactly the masked gradient; noise that DP-SGD adds to inactive entries is
removed (masked) before the state leaves the client and never reaches the forward pass.

Deviations from the paper (it fine-tunes centrally and its equations are paraphrased here):
* A and B are frozen and shared (seeded), only T trains -- the paper trains all factors; we
  freeze them so that federated averaging is exact (as FFA-LoRA does for A). The scaling s is
  ``alpha / rank``; A ~ N(0, 1/d_in), B ~ N(0, 1/r).
* Growth happens between rounds on the server from aggregated weights, not every few steps
  on one machine; the importance score is weight-based only (no gradient sensitivity).
* The budget schedule is linear in rounds; no cubic/other schedules, no rank pruning.
* The classification head trains and travels (as for every method here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import (
    NDArrays,
    export_npz,
    freeze_all_but_head,
    hash_tensors,
    replace_targets,
    seeded_normal,
    weighted_mean,
)
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["TriAdaptLinear", "TriAdaptLoraPlugin", "TriAdaptOptions", "layer_importance"]

CORE, MASK = ".core.weight", ".rank_mask"


@dataclass(frozen=True, kw_only=True)
class TriAdaptOptions:
    """``init_rank``: every layer's rank after round 0 (default ``rank // 4``, at least 1)."""

    init_rank: int = option(lambda cfg: max(1, cfg.adapter.rank // 4), low=1, high=lambda cfg: cfg.adapter.rank)


# ---- the layer -------------------------------------------------------------------------
class TriAdaptLinear(nn.Module):
    """``y = base(x) + s * B @ (m * T @ (m * A @ x))`` with a rank mask ``m``."""

    rank_mask: torch.Tensor

    def __init__(self, base: nn.Linear, rank: int, init_rank: int, scaling: float, seed: int, index: int) -> None:
        super().__init__()
        self.base, self.scaling, self.init_rank = base, scaling, init_rank
        dev = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)
        self.core = nn.Linear(rank, rank, bias=False, device=dev)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=dev)
        with torch.no_grad():
            self.down.weight.copy_(seeded_normal((rank, base.in_features), seed, 2 * index, base.in_features ** -0.5))
            self.up.weight.copy_(seeded_normal((base.out_features, rank), seed, 2 * index + 1, rank ** -0.5))
            self.core.weight.zero_()
        self.down.weight.requires_grad_(False)
        self.up.weight.requires_grad_(False)
        self.register_buffer("rank_mask", initial_mask(rank, init_rank, dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the factors are float32 under a bfloat16 base too (as PEFT's LoRA): cast in and back out
        h = self.down(x.to(self.down.weight.dtype)) * self.rank_mask
        return self.base(x) + (self.scaling * self.up(self.core(h) * self.rank_mask)).to(x.dtype)


def initial_mask(rank: int, init_rank: int, device: torch.device | None = None) -> torch.Tensor:
    mask = torch.zeros(rank, device=device)
    mask[:init_rank] = 1.0
    return mask


def layer_importance(core: np.ndarray, k: int) -> float:
    """Normalised Frobenius norms of the active lower (with diagonal) and upper triangles."""
    block = np.asarray(core, dtype=np.float64)[:k, :k]
    lower = np.linalg.norm(np.tril(block)) / math.sqrt(k * (k + 1) / 2)
    upper = np.linalg.norm(np.triu(block, 1)) / math.sqrt(k * (k - 1) / 2) if k > 1 else 0.0
    return float(lower + upper)


def _layers(model: nn.Module) -> list[tuple[str, TriAdaptLinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, TriAdaptLinear)), key=lambda x: x[0])


class TriAdaptLoraPlugin(AdapterPlugin):
    """TriAdaptLoRA with server-decided rank growth; only T (and the head) train and travel."""

    name = "triadapt_lora"
    paper = "TriAdaptLoRA (Liang, Wang, Zeng, arXiv:2501.08008, 2025)"
    travels = "r x r core T per layer (masked) + head; rank masks broadcast only"
    exact_average = True
    central_dp_compatible = False  # masks carried from previous + rank-growth server_step
    options_type = TriAdaptOptions

    def settings(self, cfg: RunConfig) -> TriAdaptOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, TriAdaptOptions, cfg)

    # ---- client half -------------------------------------------------------------------
    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a, k0 = cfg.adapter, self.settings(cfg).init_rank
        freeze_all_but_head(model)
        replace_targets(model, a.target_modules,
                        lambda i, lin: TriAdaptLinear(lin, a.rank, k0, a.alpha / a.rank, a.seed, i))
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        for name, layer in _layers(model):
            m = layer.rank_mask
            state[name + CORE] = layer.core.weight.detach() * torch.outer(m, m)
        return state

    def broadcast_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The server-decided rank masks (sent down with the global state, never up)."""
        return {name + MASK: layer.rank_mask.detach().clone() for name, layer in _layers(model)}

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        layers = dict(_layers(model))
        masks = {k: v for k, v in state.items() if k.endswith(MASK)}
        for key in masks:
            if key[: -len(MASK)] not in layers:
                raise KeyError(f"unknown tensor {key!r} for method {self.name}")
        super().load_state(model, {k: v for k, v in state.items() if not k.endswith(MASK)})
        with torch.no_grad():
            for name, layer in layers.items():
                value = masks.get(name + MASK)
                mask = (initial_mask(len(layer.rank_mask), layer.init_rank) if value is None
                        else torch.as_tensor(np.asarray(value), dtype=torch.float32))
                if mask.shape != layer.rank_mask.shape or not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"{name}{MASK}: expected a 0/1 vector of length {len(layer.rank_mask)}")
                layer.rank_mask.copy_(mask.to(layer.rank_mask.device))
                layer.core.weight.mul_(torch.outer(layer.rank_mask, layer.rank_mask))

    def frozen_fingerprint(self, model: nn.Module) -> str:
        frozen = {}
        for name, layer in _layers(model):
            frozen[name + ".down"], frozen[name + ".up"] = layer.down.weight, layer.up.weight
        return hash_tensors(frozen)

    # ---- server half -------------------------------------------------------------------
    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays:
        """Weighted mean of T and head (exact); the current masks are carried over."""
        out = weighted_mean(states, weights)
        out.update({k: np.array(v, copy=True) for k, v in previous.items() if k.endswith(MASK)})
        return out

    def server_step(self, server_round: int, state: NDArrays, cfg: RunConfig) -> NDArrays:
        """Grow ranks: linear total budget; increments go to the most important layers."""
        out = dict(state)
        cores = sorted(k for k in state if k.endswith(CORE))
        if not cores:
            return out
        r_max, k0 = cfg.adapter.rank, self.settings(cfg).init_rank
        ranks = {}
        for key in cores:
            mask = out.get(key[: -len(CORE)] + MASK)
            ranks[key] = int(np.sum(mask)) if mask is not None else k0
        n = len(cores)
        progress = min(1.0, server_round / max(1, cfg.train.rounds - 1))
        budget = min(n * r_max, n * k0 + math.floor((n * r_max - n * k0) * progress + 1e-9))
        importance = {key: layer_importance(state[key], ranks[key]) for key in cores}
        order = sorted(cores, key=lambda key: (-importance[key], key))
        while sum(ranks.values()) < budget:
            for key in order:
                if ranks[key] < r_max and sum(ranks.values()) < budget:
                    ranks[key] += 1
        for key in cores:
            mask = np.zeros(r_max, dtype=np.float32)
            mask[: ranks[key]] = 1.0
            out[key[: -len(CORE)] + MASK] = mask
            out[key] = (state[key] * np.outer(mask, mask)).astype(state[key].dtype)  # new blocks: zero
        return out

    def export(self, model: nn.Module, directory: Path) -> None:
        export_npz({**self.trainable_state(model), **self.broadcast_masks(model)}, directory)
