"""SoKA: Kronecker-product adaptation initialised by a Kronecker-product SVD of W0.

Paper: Yee Hin Chong, Peng Qu, "Singular Value Decomposition on Kronecker Adaptation for
Large Language Model" (SoKA), arXiv:2506.15251 (2025).

Method: a target weight W0 (out x in, out = m1*m2, in = n1*n2, factors from PEFT LoKr's
``factorization``) is rearranged (Van Loan-Pitsianis) so that its SVD is a Kronecker
product SVD, ``W0 = sum_k sigma_k U_k (x) V_k``. The rank ``r`` is chosen from the
spectrum alone (no data): the smaller of the energy rank (smallest r whose sigma^2 reach
``energy`` of the total) and the elbow rank (largest distance of the normalised spectrum
from its chord), capped by ``adapter.rank``. The top-r components become the adapter,
PiSSA-style: ``W = (W0 - sum_k A_k (x) B_k^0) + sum_k A_k (x) B_k`` with
``A_k = sigma_k U_k`` and ``B_k^0 = V_k``, so the model starts exactly at W0.
Federated choice: only the B factors train (A frozen), so
``dW = sum_k A_k (x) (B_k - B_k^0)`` is linear in B.
What travels: the B factors (r x m2 x n2 per layer) + the head.
Averaging: exact (linear in B). A and B^0 are computed from W0 on every client and
hash-checked every round.
DP: works with Opacus hooks mode (exact per-sample gradients via the DeltaLinear grad
sampler).

Options (``adapter.options``): ``energy`` (default 0.9), rank cap = ``adapter.rank``.

Deviations from the paper:
* only the B factors train (the paper trains both factors); this is what makes FedAvg exact;
* the rank is selected once from W0, per layer, and then fixed for the whole run (the
  paper's dynamic rank selection prunes during training; federated clients must keep the
  same shapes);
* the factor shapes come from PEFT's ``factorization`` (near-square), not a searched split;
* PEFT's LoKr (``LoKrConfig``) is the closest relative (random/zero init, one Kronecker
  term); its ParameterDict layout is not Opacus-compatible, hence our own layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lokr.layer import factorization
from torch import nn

from fedpeft.adapters.common import single_threaded
from fedpeft.adapters.delta_linear import ADAPTER_DTYPE, DeltaLinear, DeltaPlugin
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["SokaLinear", "SokaOptions", "SokaPlugin", "kpsvd", "select_rank"]


@dataclass(frozen=True, kw_only=True)
class SokaOptions:
    """``energy``: the share of W0's squared Kronecker spectrum the selected rank must reach."""

    energy: float = option(0.9, low=1e-6, high=1.0)


def kpsvd(weight: torch.Tensor, m: tuple[int, int], n: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Kronecker-product SVD: ``weight = sum_k S[k] * kron(U[k], V[k])`` with
    U[k] (m1 x n1), V[k] (m2 x n2); returns (U, S, V) sorted by S descending."""
    (m1, m2), (n1, n2) = m, n
    w = weight.detach().to("cpu", torch.float64)
    rearranged = w.view(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    with single_threaded():  # same bits in every process (frozen parts are hash-checked)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
    return u.T.reshape(-1, m1, n1), s, vh.reshape(-1, m2, n2)


def select_rank(singular: torch.Tensor, energy: float, cap: int) -> int:
    """min(energy rank, elbow rank), clamped to [1, cap]."""
    power = singular.double() ** 2
    cum = torch.cumsum(power, 0) / power.sum()
    r_energy = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
    n = singular.numel()
    if n < 3:
        return max(1, min(r_energy, cap, n))
    y = (singular.double() - singular[-1]) / max(float(singular[0] - singular[-1]), 1e-12)
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    r_elbow = int(torch.argmax((1 - x) - y).item()) + 1  # distance below the chord from (0,1) to (1,0)
    return max(1, min(r_energy, r_elbow, cap))


class SokaLinear(DeltaLinear):
    """``W0 + sum_k kron(A_k, B_k - B_k^0)``; A and B^0 from W0's KPSVD, B trains."""

    kron_a: torch.Tensor
    kron_b_init: torch.Tensor

    def __init__(self, base: nn.Linear, energy: float, cap: int) -> None:
        super().__init__(base)
        self.m = factorization(self.out_features)
        self.n = factorization(self.in_features)
        u, s, v = kpsvd(base.weight, self.m, self.n)
        r = select_rank(s, energy, cap)
        dev, dtype = base.weight.device, ADAPTER_DTYPE
        self.add_frozen("kron_a", (u[:r] * s[:r, None, None]).to(dev, dtype))
        self.add_frozen("kron_b_init", v[:r].clone().to(dev, dtype))
        self.kron_b = nn.Parameter(v[:r].clone().to(dev, dtype))

    @property
    def rank(self) -> int:
        return int(self.kron_b.shape[0])

    def delta_weight(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        d = params["kron_b"] - self.kron_b_init
        full = torch.einsum("kia,kjb->ijab", self.kron_a, d)
        return full.reshape(self.out_features, self.in_features)


class SokaPlugin(DeltaPlugin):
    """SoKA: KPSVD-initialised Kronecker adapter; only B trains, so FedAvg is exact."""

    name = "soka"
    paper = "SoKA (Chong & Qu, arXiv:2506.15251, 2025)"
    travels = "Kronecker B factors + head (A, B0 from W0's KPSVD, hash-checked)"
    exact_average = True
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step
    options_type = SokaOptions

    def settings(self, cfg: RunConfig) -> SokaOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, SokaOptions, cfg)

    def make_layer(self, name: str, index: int, base: nn.Linear, cfg: RunConfig) -> DeltaLinear:
        return SokaLinear(base, self.settings(cfg).energy, cfg.adapter.rank)
