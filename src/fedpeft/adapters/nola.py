"""NOLA: LoRA whose factors are linear combinations of seeded random bases.

Paper: Soroush Abbasi Koohpayegani, K. L. Navaneet, Parsa Nooralinejad, Soheil Kolouri,
Hamed Pirsiavash, "NOLA: Compressing LoRA using Linear Combination of Random Basis",
ICLR 2024 (arXiv:2310.02556).

Method: for each adapted weight, ``dW = s * B @ A`` with ``A = sum_i alpha_i A_i`` and
``B = sum_j beta_j B_j``; the bases ``A_i`` (r x in) and ``B_j`` (out x r) are random and
frozen, generated from ``adapter.seed`` and the layer index with a private CPU
``torch.Generator`` (identical on every client; their SHA-256 is checked every round);
only the coefficients train. ``beta`` starts at zero, so the model starts at W0.

Federated variant (default, ``train_a=false``): ``alpha`` is frozen too (seeded), so
``dW = s * (sum_j beta_j B_j) @ A`` is linear in ``beta``.
What travels: ``beta`` (``num_basis`` numbers per layer) + the classification head.
Averaging: exact in the default variant (the mean of the betas gives the mean of the dW).
With ``train_a=true`` (the paper's NOLA) alpha also trains and travels, and averaging is
NOT exact (dW is bilinear in alpha and beta, the FedAvg-of-LoRA problem).

DP: works with Opacus hooks mode; per-sample gradients come from the DeltaLinear grad
sampler (:mod:`fedpeft.adapters.delta_linear`), exact, no approximation.

Options (``adapter.options``): ``num_basis`` (k, default 256), ``train_a`` (default false).
Rank and scale come from ``adapter.rank`` / ``adapter.alpha`` (s = alpha / rank).

Deviations from the paper:
* the default federated variant freezes alpha (paper trains both coefficient vectors);
* bases are uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (A_i: fan_in = in, B_j: fan_in = r)
  generated per layer and kept in memory (the paper regenerates them on the fly to save
  GPU memory; at MiniLM size they cost k*r*(in+out) floats per layer);
* alpha is initialised uniform with variance 1/k so A has LoRA's usual scale; the paper's
  code initialises alpha randomly and beta at zero as well;
* the paper uses separate numbers of bases for A and B; we use one ``num_basis`` for both;
* PEFT has no NOLA (VeRA is the closest relative: frozen random A/B with trainable scaling
  vectors); its ParameterDict layout is not Opacus-compatible, hence our own layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.adapters.delta_linear import ADAPTER_DTYPE, DeltaLinear, DeltaPlugin
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["NolaLinear", "NolaOptions", "NolaPlugin"]


@dataclass(frozen=True, kw_only=True)
class NolaOptions:
    """``num_basis`` (k, bases per factor) and ``train_a`` (the paper's variant: alpha trains too)."""

    num_basis: int = option(256, low=1, high=65536)
    train_a: bool = option(False)


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class NolaLinear(DeltaLinear):
    """``W0 + s * (sum_j beta_j B_j) @ (sum_i alpha_i A_i)``, bases seeded and frozen."""

    basis_a: torch.Tensor
    basis_b: torch.Tensor

    def __init__(self, base: nn.Linear, rank: int, num_basis: int, scale: float, seed: int, train_a: bool) -> None:
        super().__init__(base)
        gen = torch.Generator().manual_seed(seed)
        dev, dtype = base.weight.device, ADAPTER_DTYPE
        self.scale = scale
        self.add_frozen("basis_a", _uniform((num_basis, rank, self.in_features), 1 / math.sqrt(self.in_features),
                                                 gen).to(dev, dtype))
        self.add_frozen("basis_b", _uniform((num_basis, self.out_features, rank), 1 / math.sqrt(rank),
                                                 gen).to(dev, dtype))
        alpha = _uniform((num_basis,), math.sqrt(3.0 / num_basis), gen).to(dev, dtype)
        self.alpha = nn.Parameter(alpha, requires_grad=train_a)
        self.beta = nn.Parameter(torch.zeros(num_basis, device=dev, dtype=dtype))

    def delta_weight(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = torch.einsum("k,kri->ri", params["alpha"], self.basis_a)
        b = torch.einsum("k,kor->or", params["beta"], self.basis_b)
        return self.scale * (b @ a)


class NolaPlugin(DeltaPlugin):
    """NOLA; default federated variant trains only beta, so FedAvg is exact."""

    name = "nola"
    paper = "NOLA (Koohpayegani et al., ICLR 2024)"
    travels = "beta coefficients + head (bases and alpha regenerated from seed, hash-checked)"
    exact_average = True
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step
    options_type = NolaOptions

    def settings(self, cfg: RunConfig) -> NolaOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, NolaOptions, cfg)

    def make_layer(self, name: str, index: int, base: nn.Linear, cfg: RunConfig) -> DeltaLinear:
        a, opts = cfg.adapter, self.settings(cfg)
        return NolaLinear(base, a.rank, opts.num_basis, a.alpha / a.rank, seed=a.seed * 1_000_003 + index,
                          train_a=opts.train_a)
