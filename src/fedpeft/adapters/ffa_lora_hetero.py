"""FFA-LoRA with heterogeneous ranks: client i uses the first r_i rank components.

Based on FFA-LoRA (Sun et al., ICLR 2024; :mod:`fedpeft.adapters.ffa_lora`), with the
zero-padding aggregation of heterogeneous-rank federated LoRA (HeteroLoRA-style; cf. Cho
et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, which also pads lower-rank clients with zeros).

Every process builds the same frozen A of the run's maximum rank R from the shared seed.
A client with rank tier r_i <= R uses only the first r_i rows of A (the others are zeroed
on its copy) and trains and sends a B with r_i columns. The scale s = alpha / R is the same
for everyone, so the update of each adapted weight is

    dW_i = s * B_i @ A[:r_i] = s * pad(B_i) @ A

with ``pad`` appending R - r_i zero columns. The server pads every reply to R columns and
takes the weighted mean: mean_k(s * pad(B_k) @ A) = s * mean_k(pad(B_k)) @ A -- exact,
because dW is linear in B. (Columns beyond r_i are thereby averaged with zeros; that IS the
weighted mean of the clients' dW, and the property tests check.)

What travels: ``lora_B[:, :r_i]`` + head; never A. Deviations: the HeteroLoRA paper also
prunes ranks adaptively and self-regularises; here tiers are fixed by the scenario.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.capabilities import RankTiers
from fedpeft.adapters.common import NDArrays, hash_tensors, rank_slice
from fedpeft.adapters.ffa_lora import FfaLoraPlugin
from fedpeft.adapters.lora import lora_a_tensors, lora_layers
from fedpeft.config import RunConfig

__all__ = ["FfaLoraHeteroPlugin", "pad_state"]

_FULL_A = "_fedpeft_full_lora_a"
_RANK = "_fedpeft_client_rank"


def pad_state(state: Mapping[str, np.ndarray], full: Mapping[str, tuple[int, ...]]) -> NDArrays:
    """Zero-pad every ``lora_B`` whose column count and every ``lora_A`` whose row count is below
    its full shape (server side; A travels only in methods that train it, e.g. ``flora``).

    Other tensors, and tensors already of full shape, pass unchanged; a B (A) with MORE columns
    (rows) or another row (column) count is left as is, so validation rejects it.
    """
    out: NDArrays = {}
    for name, value in state.items():
        want = full.get(name)
        out[name] = value
        if want is None or value.ndim != 2 or len(want) != 2:
            continue
        if "lora_B" in name and value.shape[0] == want[0] and value.shape[1] < want[1]:
            out[name] = np.zeros(want, dtype=value.dtype)
            out[name][:, : value.shape[1]] = value
        elif "lora_A" in name and value.shape[1] == want[1] and value.shape[0] < want[0]:
            out[name] = np.zeros(want, dtype=value.dtype)
            out[name][: value.shape[0]] = value
    return out


class FfaLoraHeteroPlugin(FfaLoraPlugin, RankTiers):
    """FFA-LoRA whose clients may train the first r_i <= R rank components only."""

    name = "ffa_lora_hetero"
    paper = "FFA-LoRA (Sun et al., ICLR 2024) + zero-padded heterogeneous ranks"
    travels = "lora_B[:, :r_i] + head (A from seed; server zero-pads to rank R)"
    exact_average = True
    central_dp_compatible = False  # replies are narrower than the global B: no per-client update to clip

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        peft_model = super().attach(model, cfg)
        full = {n: a.detach().clone() for n, a in lora_a_tensors(peft_model).items()}
        object.__setattr__(peft_model, _FULL_A, full)
        object.__setattr__(peft_model, _RANK, cfg.adapter.rank)
        return peft_model

    @staticmethod
    def full_rank(model: nn.Module) -> int:
        full: dict[str, torch.Tensor] = getattr(model, _FULL_A)
        return int(next(iter(full.values())).shape[0])

    def client_rank(self, model: nn.Module) -> int:
        return int(getattr(model, _RANK))

    def set_client_rank(self, model: nn.Module, rank: int) -> None:
        """Use the first ``rank`` rows of A (others zeroed) and B's first ``rank`` columns."""
        full: dict[str, torch.Tensor] = getattr(model, _FULL_A)
        top = self.full_rank(model)
        if not 1 <= rank <= top:
            raise ValueError(f"client rank {rank} outside [1, {top}]")
        with torch.no_grad():
            for name, layer in lora_layers(model):
                a: torch.Tensor = layer.lora_A["default"].weight  # type: ignore[index,assignment]
                b: torch.Tensor = layer.lora_B["default"].weight  # type: ignore[index,assignment]
                a.copy_(full[name].to(a.device, a.dtype))
                a[rank:].zero_()
                b[:, rank:].zero_()
        object.__setattr__(model, _RANK, rank)

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install a full-rank (global) state and reset the model to rank R."""
        self.set_client_rank(model, self.full_rank(model))
        super().load_state(model, state)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        rank = self.client_rank(model)
        return rank_slice(state, rank) if rank < self.full_rank(model) else state

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors(getattr(model, _FULL_A))
