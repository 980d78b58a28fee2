"""SaRA: fine-tune the smallest-magnitude entries of the pretrained weights.

Paper: Teng Hu, Jiangning Zhang, Ran Yi, Hongrui Huang, Yabiao Wang, Lizhuang Ma,
"SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
Adaptation", ICLR 2025 (arXiv:2409.06633).

Method: in each target weight W0 the ``fraction`` of entries with the smallest |w| are
"ineffective" parameters; a sparse update on exactly those positions trains,
``W = W0 + scatter(mask, values)``. The mask is a pure function of W0 (stable sort of
|W0|, ties by position), so every client computes the same mask without data and without
communication; its SHA-256 is checked every round.
What travels: the masked values (``fraction`` x entries per target weight) + the head.
Averaging: exact -- dW is linear in the values (a scatter), so the mean of the values is
the mean of the client updates.
DP: works with Opacus hooks mode (exact per-sample gradients via the DeltaLinear grad
sampler: the per-sample weight gradient gathered at the masked positions).

Options (``adapter.options``): ``fraction`` (default 0.02 of each target weight).

Deviations from the paper:
* the mask is a top-``fraction`` selection by |w| rather than an absolute threshold, so
  every layer gets the same share (the paper's threshold gives ~the same effect);
* no nuclear-norm low-rank regulariser on the sparse update: a parameter-only loss term
  does not pass through Opacus's per-sample hooks; left out for DP and non-DP alike;
* no progressive re-selection: re-selecting from aggregated weights would change which
  positions travel; not offered (the mask stays the one computed from W0);
* no "unstructural backpropagation" memory trick (our layer materialises dW, cheap here);
* PEFT's SHiRA (sparse high-rank adapter with a custom mask function) is the closest
  relative; its ParameterDict layout is not Opacus-compatible, hence our own layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.adapters.delta_linear import ADAPTER_DTYPE, DeltaLinear, DeltaPlugin
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["SaraLinear", "SaraOptions", "SaraPlugin", "small_magnitude_mask"]


@dataclass(frozen=True, kw_only=True)
class SaraOptions:
    """``fraction``: the share of each target weight's entries (smallest |w|) that trains."""

    fraction: float = option(0.02, low=1e-6, high=1.0)


def small_magnitude_mask(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted flat indices of the ``fraction`` smallest-|w| entries (deterministic)."""
    flat = weight.detach().to("cpu", torch.float32).abs().flatten()
    count = max(1, round(fraction * flat.numel()))
    order = torch.argsort(flat, stable=True)[:count]
    return torch.sort(order).values


class SaraLinear(DeltaLinear):
    """``W0 + scatter(indices, values)``; ``indices`` from W0, ``values`` start at zero."""

    indices: torch.Tensor

    def __init__(self, base: nn.Linear, fraction: float) -> None:
        super().__init__(base)
        idx = small_magnitude_mask(base.weight, fraction).to(base.weight.device)
        self.add_frozen("indices", idx)
        self.values = nn.Parameter(torch.zeros(idx.numel(), device=base.weight.device, dtype=ADAPTER_DTYPE))

    def delta_weight(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values = params["values"]
        flat = torch.zeros(self.out_features * self.in_features, device=values.device, dtype=values.dtype)
        return flat.index_add(0, self.indices, values).view(self.out_features, self.in_features)


class SaraPlugin(DeltaPlugin):
    """SaRA: sparse update of the small-|W0| entries; exact FedAvg."""

    name = "sara"
    paper = "SaRA (Hu et al., ICLR 2025)"
    travels = "values at the small-|W0| mask + head (mask recomputed from W0, hash-checked)"
    exact_average = True
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step
    options_type = SaraOptions

    def settings(self, cfg: RunConfig) -> SaraOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, SaraOptions, cfg)

    def make_layer(self, name: str, index: int, base: nn.Linear, cfg: RunConfig) -> DeltaLinear:
        return SaraLinear(base, self.settings(cfg).fraction)
