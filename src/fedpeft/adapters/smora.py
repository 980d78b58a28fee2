"""SMoRA, federated: every rank of a LoRA is an expert, a router picks top-k ranks per token.

Paper: Ziyu Zhao, Yixiao Zhou, Didi Zhu, Tao Shen, Xuwu Wang, Jing Su, Kun Kuang, Zhongyu
Wei, Fei Wu, Yu Cheng, "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA
for Multi-Task Learning", arXiv:2501.15103 (2025).

Method as implemented. A target linear layer W0 (``adapter.target_modules``) gets a rank-r
LoRA whose r rank-1 components ``b_i a_i^T`` are the experts, and a router ``R`` (r x d_in).
For each token x: scores ``p = sigmoid(R x)``; the ``top_k`` ranks with the highest
``p_i + bias_i`` are selected (mask m); gates ``g = m * p / sum(m * p)``; output
``W0 x + s * k * sum_i g_i b_i (a_i . x)`` with s = ``alpha / rank`` (k * g_i ~ 1 per selected
rank, so one selected rank weighs like one LoRA rank). The bias only steers *selection*
(the gate values never include it), and is updated without an auxiliary loss, as in
DeepSeek-V3: ``bias_i += bias_rate * sign(mean_load - load_i)`` (under-used ranks become more
likely). Computation is dense (CPU-friendly): all r ranks are computed and masked, never
gathered.

Federation. A is frozen and generated from the adapter seed (hash-checked every round, as
FFA-LoRA's A); B (zero-initialised), the router and the classification head(s) train and
travel and are averaged with the example counts as weights. Averaging B is exact *for fixed
gates* (the output is linear in B); averaging the router is not (the gate is a non-linear
function of it), so ``exact_average`` is False.

The routing bias under DP. The bias update uses token routing counts, i.e. data, but it is
not a gradient step. Clients never update it and never report counts: during a client's
round the bias is a fixed part of the global state, so every example's forward pass depends
only on that example and the released state, and Opacus's per-example clipping plus the
ledger's accounting stay valid. The update is a *server-side* step after each round
(:meth:`SmoraPlugin.public_step`): the server routes an unlabelled sample that it holds
itself (``tasks.public_size`` examples per task, split off before the clients' data and never
given to a client) through the new global model, counts each rank's share of token
selections and moves the bias. Privacy cost for the clients: none beyond DP-SGD (it is
post-processing of released state with server-owned data); the bias travels down only. In
a single-task run (no ``[tasks]`` section) the server holds no such sample and the bias
stays zero (plain top-k routing).

Opacus. The layer owns its trainable tensors (B, router) and is the module that is called,
with a registered grad sampler (:func:`_smora_grad_sampler`) that computes exact per-sample
gradients through the masked, normalised gate (tested against per-example autograd).
The top-k mask is piecewise constant, so it contributes no gradient in autograd either.

Deviations from the paper: A frozen (shared seed) so that federated averaging of B is exact
(the paper trains A and B); sigmoid scores with gates renormalised over the selected ranks
and the DeepSeek-V3 bias update per *round* on server-held public text, not per step on the
training batch; the k * g scaling above is our choice; no expert dropout; the heads are per
task in multi-task runs (:mod:`fedpeft.data.layout`). On a causal LM (``task_type =
"causal-lm"``) there is no head: every tensor is shared, a reply does not say its client's task,
and the public sample is rendered prompts with their responses (model inputs only, no targets;
server-held text) -- the tokens a client's forward passes route.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import PublicStep, ServerState
from fedpeft.adapters.common import (
    export_npz,
    freeze_all_but_head,
    hash_tensors,
    replace_submodule,
    seeded_normal,
    target_linears,
)
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig

__all__ = ["SMoRALinear", "SmoraOptions", "SmoraPlugin", "smora_layers"]

EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class SmoraOptions:
    """``top_k`` ranks selected per token (default ``rank // 4``) and the bias update rate."""

    top_k: int = option(lambda cfg: max(1, cfg.adapter.rank // 4), low=1, high=lambda cfg: cfg.adapter.rank)
    bias_rate: float = option(0.01, low=0.0, high=1.0)


class SMoRALinear(nn.Module):
    """``W0 x + s * k * B (g(x) * (A x))`` with a top-k rank router (see module doc)."""

    def __init__(self, base: nn.Linear, rank: int, top_k: int, scaling: float, seed: int, index: int) -> None:
        super().__init__()
        self.base = base
        self.top_k, self.scaling = top_k, scaling
        dev = base.weight.device
        d_in, d_out = base.in_features, base.out_features
        # frozen nn.Parameters, not buffers: Opacus refuses trainable modules holding buffers
        self.lora_A = nn.Parameter(seeded_normal((rank, d_in), seed, 2 * index, d_in ** -0.5).to(dev),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=dev))
        self.router = nn.Parameter(seeded_normal((rank, d_in), seed, 2 * index + 1, 0.02).to(dev))
        self.route_bias = nn.Parameter(torch.zeros(rank, device=dev), requires_grad=False)
        self.counts: torch.Tensor | None = None  # rank selection counts while counting (server)
        self.token_mask: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores p, selection mask m, gates g) for inputs ``x`` (..., d_in)."""
        p = torch.sigmoid(F.linear(x, self.router.to(x.dtype)))
        with torch.no_grad():
            chosen = torch.topk(p + self.route_bias.to(p.dtype), self.top_k, dim=-1).indices
            mask = torch.zeros_like(p).scatter_(-1, chosen, 1.0)
        pm = p * mask
        return p, mask, pm / (pm.sum(-1, keepdim=True) + EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_A.to(x.dtype))
        _, mask, g = self.gates(x)
        if self.counts is not None:
            with torch.no_grad():
                w = mask
                if self.token_mask is not None and self.token_mask.shape == x.shape[:-1]:
                    w = mask * self.token_mask[..., None].to(mask.dtype)
                self.counts += w.reshape(-1, w.shape[-1]).sum(0).double()
        update = F.linear(g * h, self.lora_B.to(x.dtype))
        return self.base(x) + (self.scaling * self.top_k) * update


@register_grad_sampler(SMoRALinear)
def _smora_grad_sampler(
    layer: SMoRALinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradients of B and the router (Opacus hooks mode).

    With c = s * k, u = c * gy B (dL/d(g*h)), v = u * h (dL/dg), S = sum(m p):
    dL/dB = c * sum_t gy (g h)^T;  dL/dp_j = m_j / S * (v_j - sum_i v_i g_i);
    dL/dz = dL/dp * p (1 - p);  dL/dR = sum_t dz x^T.
    """
    x = activations[0].to(backprops.dtype)
    c = layer.scaling * layer.top_k
    with torch.no_grad():
        h = F.linear(x, layer.lora_A.to(x.dtype))
        p, mask, g = layer.gates(x)
        s = (p * mask).sum(-1, keepdim=True) + EPS
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.lora_B.requires_grad:
        out[layer.lora_B] = c * torch.einsum("n...o,n...r->nor", backprops, g * h)
    if layer.router.requires_grad:
        v = c * (backprops @ layer.lora_B.to(x.dtype)) * h
        dp = mask / s * (v - (v * g).sum(-1, keepdim=True))
        dz = dp * p * (1 - p)
        out[layer.router] = torch.einsum("n...r,n...i->nri", dz, x)
    return out


def smora_layers(model: nn.Module) -> list[tuple[str, SMoRALinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, SMoRALinear)), key=lambda x: x[0])


class SmoraPlugin(AdapterPlugin, ServerState, PublicStep):
    """SMoRA with frozen seeded A; B, router and head(s) averaged; bias set by the server."""

    name = "smora"
    paper = "SMoRA (Zhao et al., arXiv:2501.15103, 2025)"
    travels = "lora B + router + head (A from seed); routing bias down only (server step)"
    exact_average = False
    options_type = SmoraOptions

    def settings(self, cfg: RunConfig) -> SmoraOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, SmoraOptions, cfg)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a, k = cfg.adapter, self.settings(cfg).top_k
        freeze_all_but_head(model)
        for index, (name, linear) in enumerate(target_linears(model, a.target_modules)):
            replace_submodule(model, name, SMoRALinear(linear, a.rank, k, a.alpha / a.rank, a.seed, index))
        return model

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors({f"{n}.lora_A": layer.lora_A for n, layer in smora_layers(model)})

    def server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors the server sets and sends down but clients never send: the routing biases."""
        return {f"{n}.route_bias": layer.route_bias.detach() for n, layer in smora_layers(model)}

    def public_step(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], cfg: RunConfig) -> dict[str, list[float]]:
        """DeepSeek-V3 bias update from the rank loads on server-held public text; returns
        each layer's load (share of selections per rank) before the update."""
        layers = smora_layers(model)
        for _, layer in layers:
            layer.counts = torch.zeros(layer.route_bias.numel(), dtype=torch.float64, device=layer.route_bias.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    for _, layer in layers:
                        layer.token_mask = batch.get("attention_mask")
                    model(**batch)
        finally:
            model.train(was_training)
        rate = self.settings(cfg).bias_rate
        loads = {}
        for name, layer in layers:
            counts, layer.counts, layer.token_mask = layer.counts, None, None
            assert counts is not None
            total = float(counts.sum())
            if total <= 0:
                continue
            load = counts / total
            loads[name] = load.cpu().tolist()
            with torch.no_grad():
                layer.route_bias.add_(rate * torch.sign(1.0 / len(load) - load).to(layer.route_bias.dtype))
        return loads

    def export(self, model: nn.Module, directory: Path) -> None:
        export_npz({**self.trainable_state(model), **self.server_state(model)}, Path(directory))
