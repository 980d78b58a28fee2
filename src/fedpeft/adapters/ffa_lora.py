"""FFA-LoRA: federated LoRA with frozen, shared A.

Paper: Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024 (arXiv:2403.12313).

Method: every client builds the same random A from the seed the server sends (see
:func:`fedpeft.adapters.lora.seeded_lora_a`) and freezes it; only the zero-initialised B (and the
classification head) train, with DP-SGD when enabled.
What travels: every ``lora_B`` plus the head; never ``lora_A``. The adapter part of the
upload is exactly half of LoRA's (A and B have the same number of entries for query/value
of a square weight).
Averaging: exact. The update of each adapted weight is dW = s * B @ A with A shared, which
is linear in B, so s * mean_k(B_k) @ A == mean_k(s * B_k @ A).
Integrity: the server sends ``sha256(A)`` each round; a client whose A differs refuses.

Deviations from the paper: none in the method. The paper's scaling factor is left to the
user (``--alpha``; our default alpha = r gives s = 1); the paper tunes lr per setting and so
do we (see README). The classification head is trained and averaged like B (the paper
trains the head for its classification tasks too).
"""

from __future__ import annotations

import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import hash_tensors
from fedpeft.adapters.lora import inject_lora, lora_a_tensors
from fedpeft.config import RunConfig

__all__ = ["FfaLoraPlugin"]


class FfaLoraPlugin(AdapterPlugin):
    """FFA-LoRA: A frozen from a shared seed; B and head train, travel and average exactly."""

    name = "ffa_lora"
    paper = "FFA-LoRA (Sun et al., ICLR 2024)"
    travels = "lora_B + head (A regenerated from seed, hash-checked)"
    exact_average = True
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        peft_model = inject_lora(model, cfg, freeze_a=True)
        leaked = [n for n, p in peft_model.named_parameters() if "lora_A" in n and p.requires_grad]
        if leaked:  # defensive: PEFT re-enables grads on set_adapter; we must notice
            raise RuntimeError(f"lora_A is trainable after freezing: {leaked[0]}")
        return peft_model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        assert not any("lora_A" in n for n in state), "FFA-LoRA must never send lora_A"
        return state

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors(lora_a_tensors(model))
