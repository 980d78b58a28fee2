"""LoRA (Hu et al., ICLR 2022) as the federated baseline, plus the shared LoRA machinery.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).
What travels: every ``lora_A`` and ``lora_B`` plus the classification head.
Averaging: NOT exact. FedAvg averages A and B separately, and mean(B_k) @ mean(A_k) is
not mean(B_k @ A_k) -- the discrepancy FFA-LoRA removes by freezing A.

Injection uses PEFT's ``LoraConfig``/``get_peft_model`` (task type SEQ_CLS, so the
classifier is a ``modules_to_save`` copy and trains). The A matrices are then
re-initialised from the run's adapter seed with a private ``torch.Generator`` (Kaiming-
uniform bound 1/sqrt(fan_in), PEFT's default distribution) so every process builds the
same A without sending it, independent of any other use of the global RNG. B starts at
zero, so the adapted model starts equal to the base model.

Deviations from the paper: none in the method (the paper is centralised; this is its plain
FedAvg use as the baseline). No LoRA dropout (0.0: under DP-SGD it only adds noise), and
A's initialisation is seeded rather than drawn from the global RNG so that every client
starts from the same A, as FedAvg of LoRA requires.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.config import ConfigError, RunConfig
from fedpeft.tasks.registry import task_for

__all__ = ["LoraPlugin", "inject_lora", "lora_a_tensors", "lora_layers", "seeded_lora_a"]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every PEFT LoRA layer, in deterministic (name) order."""
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)), key=lambda x: x[0])


def lora_a_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The A matrices by layer name (frozen and hash-checked in FFA-LoRA and its variants)."""
    return {name: layer.lora_A["default"].weight for name, layer in lora_layers(model)}  # type: ignore[index,misc]


def seeded_lora_a(model: nn.Module, seed: int, adapter: str = "default") -> None:
    """Overwrite every ``lora_A`` from ``seed`` (identical on every machine, CPU-generated)."""
    for index, (_, layer) in enumerate(lora_layers(model)):
        weight: torch.Tensor = layer.lora_A[adapter].weight  # type: ignore[index,assignment]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        bound = 1.0 / math.sqrt(weight.shape[1])
        values = (torch.rand(weight.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        with torch.no_grad():
            weight.copy_(values.to(weight.device, weight.dtype))
            layer.lora_B[adapter].weight.zero_()  # type: ignore[index,operator]


def inject_lora(model: nn.Module, cfg: RunConfig, freeze_a: bool) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA on ``cfg.adapter.target_modules``; optionally freeze A."""
    a = cfg.adapter
    lora_cfg = LoraConfig(
        **task_for(cfg).peft_config(),
        r=a.rank,
        lora_alpha=a.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        target_modules=list(a.target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora_cfg)
    except ValueError as exc:
        raise ConfigError("adapter.target_modules", ",".join(a.target_modules), str(exc).splitlines()[0]) from None
    seeded_lora_a(peft_model, a.seed)
    if freeze_a:
        for _, layer in lora_layers(peft_model):
            # A NEW dict per layer: the class attribute is shared by every layer.
            layer.frozen_peft_weight_names = {"default": ("lora_A",)}
            layer._freeze_non_trainable_peft_weights()
    return peft_model


class LoraPlugin(AdapterPlugin):
    """Plain LoRA: A and B both train and travel."""

    name = "lora"
    paper = "LoRA (Hu et al., ICLR 2022)"
    travels = "lora_A + lora_B + head"
    exact_average = False
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        return inject_lora(model, cfg, freeze_a=False)
