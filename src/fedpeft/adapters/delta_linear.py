"""Shared machinery for weight-delta adapters (NOLA, SaRA, SoKA, Sculpting Subspaces).

Each of these methods replaces a target ``nn.Linear`` (weight ``W0``) by a
:class:`DeltaLinear`: the frozen base layer plus a differentiable weight update
``dW = f(theta)`` built from the module's *own* parameters, ``y = x (W0 + dW)^T + b``.

Why not the PEFT tuners (VeRA, SHiRA, LoKr, OSF) directly: they keep their trainable
tensors in ``nn.ParameterDict`` sub-modules that are never *called*, so Opacus (hooks mode)
cannot capture activations for them and refuses or silently lacks per-sample gradients;
OSF also projects gradients in ``Tensor.register_hook``, which Opacus bypasses (it rebuilds
``p.grad`` from per-sample gradients). Here the module that owns the parameters is the
module that is called, and one Opacus grad sampler (registered for every subclass through
the public ``opacus.grad_sample.register_grad_sampler``) computes exact per-sample
gradients for any ``f``: the per-sample gradient w.r.t. the effective weight,
``G_n = sum_t g_nt x_nt^T``, pulled back through ``f`` with ``torch.func.vjp`` + ``vmap``.
PEFT helpers are reused where they fit (LoKr's ``factorization``, OSF's SVD split).

:class:`DeltaPlugin` is the common plugin half: freeze everything, inject the layers on
``adapter.target_modules``, train the classification head (if the task type has one),
fingerprint the frozen (seeded or W0-derived) tensors, export as safetensors + JSON.

Precision: the adapter's own tensors are float32 (:data:`ADAPTER_DTYPE`) whatever the base
weights are, as PEFT keeps LoRA in float32, so the optimizer's small steps accumulate. Under a
low-precision base (a causal LM in bfloat16 on a GPU) the layer computes ``x (W0 + dW)^T`` in
float32 and rounds the output once: ``W0 + dW`` rounded to bfloat16 would drop every entry of
dW below the last bit of its W0 entry.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import hash_tensors
from fedpeft.config import ConfigError, RunConfig
from fedpeft.tasks.registry import head_prefixes

__all__ = ["ADAPTER_DTYPE", "DeltaLinear", "DeltaPlugin", "delta_layers"]

ADAPTER_DTYPE = torch.float32  # the adapter's tensors, whatever the base weights are (module doc)


class DeltaLinear(nn.Module):
    """Frozen ``base_layer`` plus ``delta_weight(params)`` from this module's own parameters.

    Subclasses keep their frozen tensors with :meth:`add_frozen` (frozen ``nn.Parameter``s,
    not buffers: Opacus refuses trainable modules that hold buffers, since buffers may be
    private running statistics) and their trainable tensors as direct ``nn.Parameter``
    attributes; every subclass gets the per-sample-gradient sampler automatically.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_grad_sampler(cls)(_delta_grad_sampler)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.out_features, self.in_features = base_layer.weight.shape

    def add_frozen(self, name: str, tensor: torch.Tensor) -> None:
        """Register a frozen (seeded or W0-derived) tensor; it moves with ``.to`` like a weight."""
        self.register_parameter(name, nn.Parameter(tensor.detach().clone(), requires_grad=False))

    @abstractmethod
    def delta_weight(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dW (out x in) as a differentiable function of this module's direct parameters."""

    def direct_params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    def effective_weight(self) -> torch.Tensor:
        """``W0 + dW``, in float32 when the base is in a lower precision (module doc)."""
        delta = self.delta_weight(self.direct_params())
        return self.base_layer.weight.to(delta.dtype) + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective_weight(), self.base_layer.bias
        if weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        # a low-precision base: computed in float32, the output rounded once (module doc)
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)


def _delta_grad_sampler(
    layer: DeltaLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a DeltaLinear's trainable parameters (Opacus hooks mode)."""
    dtype = torch.promote_types(backprops.dtype, ADAPTER_DTYPE)  # float32 also under a bfloat16 base
    x, backprops = activations[0].to(dtype), backprops.to(dtype)
    grad_w = torch.einsum("n...o,n...i->noi", backprops, x)  # per-sample dL/dW_eff (any token axes summed)
    params = layer.direct_params()
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}
    if not trainable:
        return {}

    def delta(tp: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer.delta_weight({**fixed, **tp}).to(backprops.dtype)

    _, pullback = torch.func.vjp(delta, {n: p.detach() for n, p in trainable.items()})  # type: ignore[misc]
    (per_sample,) = torch.func.vmap(pullback)(grad_w)
    return {p: per_sample[n].to(p.dtype) for n, p in trainable.items()}


def delta_layers(model: nn.Module) -> list[tuple[str, DeltaLinear]]:
    """Every injected layer, in name order."""
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)), key=lambda x: x[0])


class DeltaPlugin(AdapterPlugin):
    """Common client/server half of the DeltaLinear methods; subclasses build one layer."""

    @abstractmethod
    def make_layer(self, name: str, index: int, base: nn.Linear, cfg: RunConfig) -> DeltaLinear:
        """The adapted replacement of target layer ``name`` (``index``: its position)."""

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a = cfg.adapter
        self.attached = {"rank": a.rank, "alpha": a.alpha, "target_modules": list(a.target_modules), "seed": a.seed,
                         "options": {k: str(v) for k, v in a.options}, "base_model": cfg.model.path or "default"}
        model.requires_grad_(False)
        targets, heads = set(cfg.adapter.target_modules), head_prefixes()
        names = sorted(
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] in targets and n.split(".")[0] not in heads
        )
        if not names:
            raise ConfigError("adapter.target_modules", ",".join(cfg.adapter.target_modules),
                              f"no nn.Linear layer of the model matches (method {self.name})")
        for index, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, self.make_layer(name, index, getattr(parent, child), cfg))
        for name, param in model.named_parameters():
            if name.split(".")[0] in heads:
                param.requires_grad_(True)
        return model

    def frozen_fingerprint(self, model: nn.Module) -> str:
        """Hash of every frozen tensor the layers derive from the seed or from W0."""
        frozen: dict[str, torch.Tensor] = {}
        for lname, layer in delta_layers(model):
            for pname, param in layer.direct_params().items():
                if not param.requires_grad:
                    frozen[f"{lname}.{pname}"] = param
        return hash_tensors(frozen)

    def export(self, model: nn.Module, directory: Path) -> None:
        """``adapter_model.safetensors`` (the trainable state, i.e. what travels) plus
        ``adapter_config.json`` (method, options, seed, targets); frozen parts are rebuilt
        by ``attach`` from the same base model and seed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state(model).items()}
        save_file(state, str(directory / "adapter_model.safetensors"))
        meta: dict[str, Any] = {"method": self.name, "paper": self.paper, "format": "fedpeft-delta-v1",
                "frozen_fingerprint": self.frozen_fingerprint(model)}
        meta.update(getattr(self, "attached", {}), layers=[n for n, _ in delta_layers(model)])
        (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

