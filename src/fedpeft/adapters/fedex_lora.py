"""FedEx-LoRA: LoRA with exact aggregation through a residual folded into the frozen weight.

Paper: Raghav Singhal, Kaustubh Ponkshe, Praneeth Vepakomma, "FedEx-LoRA: Exact Aggregation
for Federated and Efficient Fine-Tuning of Foundation Models" (arXiv:2410.09432; ACL 2025).

Method: clients train A and B (plain LoRA, :mod:`fedpeft.adapters.lora`) and send both. The
server averages A and B separately, as FedAvg does, and computes per adapted layer the residual

    R = mean_k(B_k @ A_k) - mean(B) @ mean(A)

that FedAvg of LoRA loses, and folds it into the frozen weight: the global state carries
``D <- D + R`` (:mod:`fedpeft.adapters.lora_fold`) beside mean(A), mean(B). Every client installs
``W0 + s * D`` as its frozen weight and continues from mean(A), mean(B), so

    W0 + s * (D_new + mean(B) @ mean(A)) = W0 + s * D_old + s * mean_k(B_k @ A_k)
                                         = mean_k(W0 + s * (D_old + B_k @ A_k)),

the mean of the clients' effective weights: aggregation is exact. The means are the weighted
means AdapterAvg uses everywhere (weights = the replies' ``num-examples``, in float64, each
result cast back to float32; R is computed from the float32 means the clients will hold, so
the identity holds to float32 rounding of D). The head is averaged as in LoRA.

What travels: up, every ``lora_A`` and ``lora_B`` plus the head (LoRA's upload, byte for byte);
down, the same plus one ``<layer>.frozen_delta`` (d_out x d_in float32) per adapted layer, which
for the packaged MiniLM-L6 at r = 8 on query/value makes the download 24.75x LoRA's (sizes in
docs/methods-fedex-flora.md; the paper, too, sends a full-size residual down). R is
post-processing of the DP releases: no privacy cost.

Deviations from the paper: the server sends the accumulated D, not the round's residual, so
partial participation, fresh client processes and resumed runs stay exact
(:mod:`fedpeft.adapters.lora_fold`); A is initialised from the run's seed (as ``lora``); no LoRA
dropout; the server uses FedAvg only (``strategy.name = fedavg``, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.adapters.common import NDArrays, weighted_mean
from fedpeft.adapters.lora_fold import FoldedLoraPlugin, delta_key, lora_pairs

__all__ = ["FedExLoraPlugin", "residuals"]


def residuals(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
              mean: Mapping[str, np.ndarray]) -> NDArrays:
    """``mean_k(B_k A_k) - mean(B) mean(A)`` per adapted layer (float64), with ``mean`` the
    aggregated (float32) state the clients receive."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out: NDArrays = {}
    for layer, a_key, b_key in lora_pairs(states[0]):
        product = sum(wi * (s[b_key].astype(np.float64) @ s[a_key].astype(np.float64))
                      for wi, s in zip(w, states, strict=True))
        out[layer] = product - mean[b_key].astype(np.float64) @ mean[a_key].astype(np.float64)
    return out


class FedExLoraPlugin(FoldedLoraPlugin):
    """FedEx-LoRA: A and B averaged; the residual of that average folded into the frozen weight."""

    name = "fedex_lora"
    paper = "FedEx-LoRA (Singhal et al., ACL 2025)"
    travels = "up: lora_A + lora_B + head; down: those + frozen_delta (d_out x d_in per layer)"

    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays:
        """Weighted means of A, B and head; ``D`` of ``previous`` (zero before the first
        release) plus this round's residual."""
        mean = weighted_mean(states, weights)
        for layer, residual in residuals(states, weights, mean).items():
            key = delta_key(layer)
            before = previous[key].astype(np.float64) if key in previous else 0.0
            mean[key] = (before + residual).astype(np.float32)
        return mean
