"""Sculpting Subspaces (OSFT): full-rank fine-tuning constrained orthogonal to W0's top subspace.

Paper: Nikhil Shivakumar Nayak, Krishnateja Killamsetty, Ligong Han, Abhishek
Bhandwaldar, Prateek Chanda, Kai Xu, Hao Wang, Aldo Pareja, Oleg Silkin, Mustafa Eyceoz,
Akash Srivastava, "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning", arXiv:2504.07097 (2025). PEFT ships it as ``OSFConfig`` (``peft.tuners.osf``).

Method: each target weight is split by SVD (PEFT's ``decompose_weight_matrix``) into a
frozen top-``keep`` subspace ``U_h S_h V_h`` and a trainable low part ``U_l S_l V_l``. Updates
must stay orthogonal to the top subspace; we enforce it in the parametrisation, not with
gradient hooks: the layer uses ``P_U U_l`` and ``V_l P_V`` with ``P_U = I - U_h U_h^T`` and
``P_V = I - V_h^T V_h``, so every step (Adam's elementwise scaling and DP noise included)
leaves the top subspace untouched exactly.
What travels: the projected low factors ``U_l``, ``S_l``, ``V_l`` of every target weight
(``min(out, in) - keep`` singular directions: with the default keep = 50 % this is about as
many numbers as the dense weight) + the head.
Server step (in :meth:`OsftPlugin.aggregate`): for each layer the server forms every
client's low part ``L_k = U_k diag(S_k) V_k``, takes the weighted mean, projects it with
``P_U . P_V`` (it knows the frozen top subspace from its own attach) and re-factorises it by
SVD into the same shapes. Averaging: exact on the effective weights -- the mean of the
projected low parts has rank <= min(out, in) - keep, so the truncated SVD reproduces it to
float precision; the factors themselves are not averaged.
DP: works with Opacus hooks mode (exact per-sample gradients through the projection via the
DeltaLinear grad sampler). PEFT's OSF layer cannot be used under Opacus: its factors live in
an ``nn.ParameterDict`` that is never called (no activations for Opacus's hooks) and its
gradient projection is a ``Tensor.register_hook`` that Opacus's per-sample path bypasses.

Options (``adapter.options``): ``keep`` (fraction of min(out, in) kept frozen, default 0.5,
PEFT's default ``effective_rank``).

Deviations from the paper:
* a fixed ``keep`` fraction for every layer (the paper picks per-layer ranks from layer
  importance for continual learning; PEFT's default is the same fixed 50 %);
* projection by parametrisation instead of gradient projection (same constraint, holds
  exactly under Adam and DP noise);
* single task: no continual-learning sequence; the frozen subspace comes from W0 only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft.tuners.osf.utils import decompose_weight_matrix
from torch import nn

from fedpeft.adapters.common import NDArrays, single_threaded, weighted_mean
from fedpeft.adapters.delta_linear import ADAPTER_DTYPE, DeltaLinear, DeltaPlugin, delta_layers
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["OsftLinear", "OsftOptions", "OsftPlugin", "FACTORS"]

FACTORS = ("u_low", "s_low", "v_low")


@dataclass(frozen=True, kw_only=True)
class OsftOptions:
    """``keep``: the fraction of min(out, in) singular directions kept frozen (the top subspace)."""

    keep: float = option(0.5, low=0.0, high=0.99)


class OsftLinear(DeltaLinear):
    """``W0 + P_U U_l diag(S_l) V_l P_V - (U_l S_l V_l)_init``, top subspace frozen."""

    u_high: torch.Tensor
    v_high: torch.Tensor
    low_init: torch.Tensor

    def __init__(self, base: nn.Linear, keep: float) -> None:
        super().__init__(base)
        top = max(1, min(min(self.out_features, self.in_features) - 1,
                         round(keep * min(self.out_features, self.in_features))))
        with single_threaded():  # same bits in every process (frozen parts are hash-checked)
            svd = decompose_weight_matrix(base.weight.detach().to(ADAPTER_DTYPE), top_k=top)
        self.add_frozen("u_high", svd["U_high"].detach().clone())
        self.add_frozen("v_high", svd["V_high"].detach().clone())
        low = (svd["U_low"] * svd["S_low"].unsqueeze(0)) @ svd["V_low"]
        self.add_frozen("low_init", low.detach().clone())
        self.u_low = nn.Parameter(svd["U_low"].detach().clone())
        self.s_low = nn.Parameter(svd["S_low"].detach().clone())
        self.v_low = nn.Parameter(svd["V_low"].detach().clone())

    def project(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_U u, v P_V): remove any component in the frozen top subspace."""
        return u - self.u_high @ (self.u_high.T @ u), v - (v @ self.v_high.T) @ self.v_high

    def delta_weight(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u, v = self.project(params["u_low"], params["v_low"])
        return (u * params["s_low"].unsqueeze(0)) @ v - self.low_init


class OsftPlugin(DeltaPlugin):
    """OSFT: clients train the low subspace; the server averages, projects, re-factorises."""

    name = "osft"
    paper = "Sculpting Subspaces / OSFT (Nayak et al., arXiv:2504.07097, 2025)"
    travels = "low-subspace factors U_l, S_l, V_l + head (top subspace from W0's SVD, hash-checked)"
    exact_average = True
    central_dp_compatible = False  # aggregate re-SVDs the mean before the noise
    options_type = OsftOptions

    def __init__(self) -> None:
        self.high: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (U_h, V_h), from attach

    def settings(self, cfg: RunConfig) -> OsftOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, OsftOptions, cfg)

    def make_layer(self, name: str, index: int, base: nn.Linear, cfg: RunConfig) -> DeltaLinear:
        return OsftLinear(base, self.settings(cfg).keep)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        model = super().attach(model, cfg)
        self.high = {n: (layer.u_high.detach().cpu().double().numpy(), layer.v_high.detach().cpu().double().numpy())
                     for n, layer in delta_layers(model) if isinstance(layer, OsftLinear)}
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Projected factors (exactly the effective low part) + head."""
        state = super().trainable_state(model)
        for lname, layer in delta_layers(model):
            assert isinstance(layer, OsftLinear)
            u, v = layer.project(layer.u_low.detach(), layer.v_low.detach())
            state[f"{lname}.u_low"], state[f"{lname}.v_low"] = u, v
        return state

    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays:
        out = weighted_mean(states, weights)  # head (and placeholders for the factors)
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        layers = sorted({k[: -len(".u_low")] for k in states[0] if k.endswith(".u_low")})
        for lname in layers:
            u0, s0, v0 = (states[0][f"{lname}.{f}"] for f in FACTORS)
            low = sum(wk * (st[f"{lname}.u_low"].astype(np.float64) * st[f"{lname}.s_low"].astype(np.float64))
                      @ st[f"{lname}.v_low"].astype(np.float64) for wk, st in zip(w, states, strict=True))
            high = self._high_for(lname, low.shape)
            if high is not None:  # project onto the orthogonal complement of the frozen top subspace
                uh, vh = high
                low = low - uh @ (uh.T @ low)
                low = low - (low @ vh.T) @ vh
            uu, ss, vv = np.linalg.svd(low, full_matrices=False)
            t = s0.shape[0]
            out[f"{lname}.u_low"] = uu[:, :t].astype(u0.dtype)
            out[f"{lname}.s_low"] = ss[:t].astype(s0.dtype)
            out[f"{lname}.v_low"] = vv[:t].astype(v0.dtype)
        return out

    def _high_for(self, lname: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """The frozen top subspace of ``lname`` known from attach (None if unknown or other shape)."""
        high = self.high.get(lname)
        if high is None or (high[0].shape[0], high[1].shape[1]) != tuple(shape):
            return None
        return high
