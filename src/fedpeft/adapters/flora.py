"""FLoRA: federated LoRA by stacking the clients' (possibly heterogeneous-rank) adapters.

Paper: Ziyao Wang, Zheyu Shen, Yexiao He, Guoheng Sun, Hongyi Wang, Lingjuan Lyu, Ang Li,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024 (arXiv:2409.05976).

Method: every round each client trains a fresh LoRA adapter (B = 0, A from the server) of its
rank r_k and sends A_k and B_k. The server stacks them, per adapted layer,

    B_stack = [p_1 B_1, ..., p_K B_K]  (d_out x sum r_k),   A_stack = [A_1; ...; A_K]  (sum r_k x d_in),

so that ``B_stack @ A_stack = sum_k p_k B_k A_k`` exactly (p_k: the weighted-mean weights
AdapterAvg uses, ``num-examples`` normalised), folds the product into the frozen weight
(``D <- D + B_stack @ A_stack``, :mod:`fedpeft.adapters.lora_fold`) and starts the next round's
adapters afresh: B = 0 and a new A drawn by the server from the run's adapter seed and the
round number (:func:`fresh_a`; it travels as values in the global state, as LoRA's A does; no
client randomness comes from it). The server's model is then ``W0 + s * D`` with B = 0, and

    W0 + s * D_new = mean_k(W0 + s * (D_old + B_k @ A_k)),

the mean of the clients' effective weights: exact, for any mix of ranks. The head is averaged.

Heterogeneous ranks (:class:`~fedpeft.adapters.capabilities.RankTiers`, as ``ffa_lora_hetero``
and the device emulation of :mod:`fedpeft.sim.hetero`): a client of rank r_k <= R uses the first
r_k rows of A and columns of B (the rest zeroed, and masked out of the forward pass so that
DP-SGD's noise on them cannot act either) and sends ``lora_A[:r_k]`` and ``lora_B[:, :r_k]``; the
server zero-pads both to R (:func:`fedpeft.adapters.ffa_lora_hetero.pad_state`). Zero rows and
columns add nothing to the stack's product, so padding keeps the aggregate exact. Compare
``ffa_lora_hetero``: it is exact because A is frozen and shared (dW is linear in B, the padded
mean of B is the mean of the dW); here A trains, the padded *mean* of A and B would not be
exact (mean(B) mean(A) != mean(B A)), and stacking is what makes it so. One scale
``s = alpha / R`` serves every rank (the paper scales each client's module by its own
``alpha / r_k``; with a common alpha this only rescales a low-rank client's learning rate).

What travels: up, ``lora_A[:r_k]`` + ``lora_B[:, :r_k]`` + head (LoRA's upload at rank r_k); down,
the fresh A, zero B, head and one ``<layer>.frozen_delta`` (d_out x d_in float32) per adapted
layer. Deviations from the paper: it sends the round's stacked modules (sum r_k (d_in + d_out)
values per layer) and lets clients add their product themselves, which needs every client
every round; here the server sends the accumulated D (full-size, larger than the stack for
small federations) so that partial participation, fresh client processes and resumed runs
stay exact. The stacking is materialised on the server (:func:`stack`). The fold is
post-processing of DP releases: no privacy cost. FedAvg only (``strategy.name = fedavg``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.capabilities import RankTiers
from fedpeft.adapters.common import NDArrays, rank_slice, weighted_mean
from fedpeft.adapters.lora import lora_layers
from fedpeft.adapters.lora_fold import FoldedLoraPlugin, delta_key, lora_pairs
from fedpeft.config import RunConfig

__all__ = ["FloraPlugin", "fresh_a", "stack"]

_RANK = "_fedpeft_client_rank"
_MASK = "_fedpeft_rank_mask"  # on each lora_B module: (R,) 0/1 mask of the ranks in use, None = all


def stack(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(B_stack, A_stack) per adapted layer, float64: ``[p_1 B_1, ..., p_K B_K]`` and ``[A_1; ...; A_K]``."""
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return {layer: (np.concatenate([p * s[b].astype(np.float64) for p, s in zip(w, states, strict=True)], axis=1),
                    np.concatenate([s[a].astype(np.float64) for s in states], axis=0))
            for layer, a, b in lora_pairs(states[0])}


def fresh_a(shape: tuple[int, ...], seed: int, server_round: int, index: int) -> np.ndarray:
    """The A of layer ``index`` for the round after ``server_round``: Kaiming-uniform (bound
    1/sqrt(d_in), as :func:`fedpeft.adapters.lora.seeded_lora_a`) from the run's adapter seed."""
    digest = hashlib.sha256(f"flora|{seed}|{server_round}|{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bound = 1.0 / math.sqrt(shape[1])
    return ((torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound).numpy()


def _mask_ranks(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """Forward pre-hook of ``lora_B``: zero the input's unused rank components (A's rows >= r_k)."""
    mask = getattr(module, _MASK, None)
    return None if mask is None else (args[0] * mask, *args[1:])


class FloraPlugin(FoldedLoraPlugin, RankTiers):
    """FLoRA: fresh adapters each round, stacked and folded into the frozen weight by the server."""

    name = "flora"
    paper = "FLoRA (Wang et al., NeurIPS 2024)"
    travels = ("up: lora_A[:r_i] + lora_B[:, :r_i] + head (server zero-pads to R); "
               "down: fresh A, zero B, head + frozen_delta (d_out x d_in per layer)")

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        peft_model = super().attach(model, cfg)
        for _, layer in lora_layers(peft_model):
            b = layer.lora_B["default"]  # type: ignore[index]
            object.__setattr__(b, _MASK, None)
            b.register_forward_pre_hook(_mask_ranks)
        object.__setattr__(peft_model, _RANK, cfg.adapter.rank)
        return peft_model

    @staticmethod
    def full_rank(model: nn.Module) -> int:
        return int(lora_layers(model)[0][1].lora_A["default"].weight.shape[0])  # type: ignore[index]

    def client_rank(self, model: nn.Module) -> int:
        return int(getattr(model, _RANK))

    def set_client_rank(self, model: nn.Module, rank: int) -> None:
        """Use the first ``rank`` rank components only: A's other rows and B's other columns
        are zeroed and masked out of the forward pass (noise added to them by DP-SGD cannot act)."""
        top = self.full_rank(model)
        if not 1 <= rank <= top:
            raise ValueError(f"client rank {rank} outside [1, {top}]")
        with torch.no_grad():
            for _, layer in lora_layers(model):
                a: torch.Tensor = layer.lora_A["default"].weight  # type: ignore[index,assignment]
                b_module = layer.lora_B["default"]  # type: ignore[index]
                a[rank:].zero_()
                b_module.weight[:, rank:].zero_()  # type: ignore[index]
                mask = None
                if rank < top:
                    mask = torch.zeros(top, dtype=a.dtype, device=a.device)
                    mask[:rank] = 1
                object.__setattr__(b_module, _MASK, mask)
        object.__setattr__(model, _RANK, rank)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The client's rank components only (all of them at rank R)."""
        rank, state = self.client_rank(model), super().trainable_state(model)
        return state if rank == self.full_rank(model) else rank_slice(state, rank)

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Back to rank R (no mask), then the delta and the trainable tensors of the global state."""
        self.set_client_rank(model, self.full_rank(model))
        super().load_state(model, state)

    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays:
        """Head (and placeholder A, B) averaged; ``D`` of ``previous`` (zero before the first
        release) plus the stack's product. :meth:`server_step` restarts A and B."""
        out = weighted_mean(states, weights)
        for layer, (b_stack, a_stack) in stack(states, weights).items():
            key = delta_key(layer)
            before = previous[key].astype(np.float64) if key in previous else 0.0
            out[key] = (before + b_stack @ a_stack).astype(np.float32)
        return out

    def server_step(self, server_round: int, state: NDArrays, cfg: RunConfig) -> NDArrays:
        """Fresh adapters for the next round: B = 0, A from :func:`fresh_a`."""
        out = dict(state)
        for index, (_, a_key, b_key) in enumerate(lora_pairs(state)):
            out[a_key] = fresh_a(state[a_key].shape, cfg.adapter.seed, server_round, index).astype(state[a_key].dtype)
            out[b_key] = np.zeros_like(state[b_key])
        return out
