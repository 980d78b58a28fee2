"""ABMLL, federated: Bayesian LoRA with a global prior and a per-client posterior.

Paper: Liyi Zhang, Jake C. Snell, Thomas L. Griffiths, "Amortized Bayesian Meta-Learning for
Low-Rank Adaptation of Large Language Models", arXiv:2508.14285 (2025).

Method as implemented. Every target linear layer gets ``dW = s * W_B @ A`` with A frozen and
seeded (as in FFA-LoRA) and a *random* B: the client ``i`` (a "task" of the paper) holds a
diagonal-Gaussian posterior ``q_i(B) = N(theta + mu_i, sigma_i^2)``; the federation shares a
prior ``p(B) = N(theta, prior_std^2)`` whose mean theta is global. Local training maximises
the ELBO with the reparameterisation trick (one weight sample per example,
``B_n = theta + mu_i + sigma_i * eps_n``):
``loss = mean_n CE(f(x_n; B_n), y_n) + kl_weight * mean_elements KL(q_i || p)``.
The KL term depends on (mu_i, sigma_i) only and pulls the client's offset towards the shared
prior; theta is trained by the likelihood term and federated.
What never leaves the client: mu_i and sigma_i (``local_state``), restored each round from the
node's ``Context.state`` by the ClientApp. What travels: theta (d_out x r per layer) + head.
Averaging: exact for what travels -- the global model (prior mean, used for central
evaluation) has dW = s * theta @ A, linear in theta, so averaging theta averages dW.
DP: yes. The posterior layer has its own Opacus grad sampler: the per-sample gradient of the
sampled weight is ``g_n h_n^T`` and by the chain rule gives theta's, mu's and sigma's (times
eps_n); the KL gradient, identical for every example, is added to each per-sample gradient
before clipping -- exactly the per-example loss above, so the mean over a batch equals the
non-DP gradient (tested). Under DP the ELBO's KL therefore shares the clipping.

Options (``--set adapter.options.NAME=VALUE``): ``kl_weight`` (beta, default 0.1),
``prior_std`` (default 0.05), ``init_std`` (initial sigma, default 1e-3).

Deviations from the paper:
* Clients are the paper's tasks; the global parameters are learnt by FedAvg of theta, not by
  back-propagating through amortised task adaptation; the paper's hyper-prior term on the
  global parameters (its gamma-weighted KL) and a learnt global variance are left out: the
  prior variance is the fixed option ``prior_std``, so nothing about sigma_i ever travels.
* Both terms are means (per example, per posterior element), so beta does not depend on the
  dataset or adapter size; the paper weights sums.
* A is frozen and shared (FFA-LoRA style) so that averaging is exact; only B is Bayesian.
* Central evaluation uses the prior mean (the global model); the personalised posterior mean
  theta + mu_i is used for training only and is not evaluated centrally.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import NDArrays, export_npz, freeze_all_but_head, hash_tensors, replace_targets
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch
from fedpeft.tasks.base import TaskType

__all__ = ["AbmllOptions", "AbmllPlugin", "BayesB", "BayesLoraLinear", "LOCAL_NAMES"]

LOCAL_NAMES = ("post_offset", "post_rho")  # the local posterior; never in trainable_state


@dataclass(frozen=True, kw_only=True)
class AbmllOptions:
    """The ELBO's KL weight beta, the prior's and the initial posterior's standard deviation."""

    kl_weight: float = option(0.1, low=0.0, high=1e6)
    prior_std: float = option(0.05, low=1e-6, high=1e3)
    init_std: float = option(1e-3, low=1e-8, high=1e3)


def _inv_softplus(x: float) -> float:
    return float(np.log(np.expm1(x)))


class BayesB(nn.Module):
    """The Bayesian up-projection; owns theta (global) and the local posterior (mu, rho)."""

    def __init__(self, rank: int, out_features: int, init_std: float, prior_std: float, device: torch.device) -> None:
        super().__init__()
        self.prior_mean = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.post_offset = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.post_rho = nn.Parameter(torch.full((out_features, rank), _inv_softplus(init_std), device=device))
        self.init_rho, self.prior_std = _inv_softplus(init_std), prior_std
        self.kl_scale = 0.0  # kl_weight / (posterior elements of the whole model), set by attach
        self._eps: torch.Tensor | None = None

    def kl(self) -> torch.Tensor:
        """Sum over elements of KL(N(theta+mu, sigma^2) || N(theta, prior_std^2))."""
        sigma, s2 = F.softplus(self.post_rho), self.prior_std**2
        return (torch.log(self.prior_std / sigma) + (sigma**2 + self.post_offset**2) / (2 * s2) - 0.5).sum()

    def kl_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of ``kl_scale * kl()`` w.r.t. (post_offset, post_rho), in closed form."""
        sigma, s2 = F.softplus(self.post_rho), self.prior_std**2
        g_mu = self.post_offset / s2
        g_rho = (-1.0 / sigma + sigma / s2) * torch.sigmoid(self.post_rho)
        return self.kl_scale * g_mu.detach(), self.kl_scale * g_rho.detach()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.prior_mean + self.post_offset
        if not self.training:
            return h @ mean.t()
        eps = torch.randn((h.shape[0], *mean.shape), device=h.device, dtype=h.dtype)
        self._eps = eps
        weight = mean + F.softplus(self.post_rho) * eps  # one sample per example
        return torch.einsum("n...r,nor->n...o", h, weight)


@register_grad_sampler(BayesB)
def _bayes_grad_sample(layer: BayesB, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-example gradients for Opacus (hooks mode), KL gradient included per example."""
    h = activations[0].to(backprops.dtype)
    g_w = torch.einsum("n...o,n...r->nor", backprops, h)
    assert layer._eps is not None and layer._eps.shape == g_w.shape, "BayesB: forward/backward mismatch"
    kl_mu, kl_rho = layer.kl_grads()
    out = {}
    if layer.prior_mean.requires_grad:
        out[layer.prior_mean] = g_w
    if layer.post_offset.requires_grad:
        out[layer.post_offset] = g_w + kl_mu
    if layer.post_rho.requires_grad:
        out[layer.post_rho] = g_w * layer._eps * torch.sigmoid(layer.post_rho) + kl_rho
    return out


class BayesLoraLinear(nn.Module):
    """``y = base(x) + s * B(A x)`` with A frozen (seeded) and B Bayesian."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, seed: int, index: int,
                 init_std: float, prior_std: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        dev = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)
        with torch.no_grad():
            bound = base.in_features**-0.5  # PEFT's Kaiming-uniform bound, as fedpeft.adapters.lora
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            self.down.weight.copy_((torch.rand((rank, base.in_features), generator=g) * 2 - 1) * bound)
        self.down.weight.requires_grad_(False)
        self.bayes = BayesB(rank, base.out_features, init_std, prior_std, dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the factors are float32 under a bfloat16 base too (as PEFT's LoRA): cast in and back out
        return self.base(x) + (self.scaling * self.bayes(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def _layers(model: nn.Module) -> list[tuple[str, BayesLoraLinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, BayesLoraLinear)), key=lambda x: x[0])


def _is_local(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LOCAL_NAMES


class AbmllPlugin(AdapterPlugin):
    """Bayesian LoRA: global prior mean theta travels; the posterior (mu, sigma) stays local."""

    name = "abmll"
    paper = "ABMLL (Zhang, Snell, Griffiths, arXiv:2508.14285, 2025)"
    travels = "prior mean theta per layer + head; posterior mean/variance stay on the client"
    exact_average = True
    options_type = AbmllOptions
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step

    def settings(self, cfg: RunConfig) -> AbmllOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, AbmllOptions, cfg)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a, opts = cfg.adapter, self.settings(cfg)
        beta, prior_std, init_std = opts.kl_weight, opts.prior_std, opts.init_std
        freeze_all_but_head(model)
        replace_targets(model, a.target_modules,
                        lambda i, lin: BayesLoraLinear(lin, a.rank, a.alpha / a.rank, a.seed, i, init_std, prior_std))
        layers = _layers(model)
        elements = sum(layer.bayes.post_offset.numel() for _, layer in layers)
        for _, layer in layers:
            layer.bayes.kl_scale = beta / elements
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and not _is_local(n)}
        assert not any(_is_local(n) for n in state), "ABMLL must never send the local posterior"
        return state

    def local_state(self, model: nn.Module) -> NDArrays:
        return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if _is_local(n)}

    def load_local_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        params = {n: p for n, p in model.named_parameters() if _is_local(n)}
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"unknown local tensor {sorted(unknown)[0]!r} for method {self.name}")
        if state and set(state) != set(params):
            raise KeyError(f"local state lacks {len(set(params) - set(state))} tensors")
        with torch.no_grad():
            for _, layer in _layers(model):
                layer.bayes.post_offset.zero_()
                layer.bayes.post_rho.fill_(layer.bayes.init_rho)
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(np.asarray(value)).to(params[name].device, params[name].dtype))

    def loss(self, model: nn.Module, batch: Batch, task_type: TaskType) -> torch.Tensor:
        """Mean task loss (CE) of sampled weights + beta * mean KL. Under Opacus the KL gradient
        is applied per example by the grad sampler (this term's own gradient is discarded)."""
        nll = task_type.loss(model, batch)
        inner = getattr(model, "_module", model)
        kl = sum((layer.bayes.kl_scale * layer.bayes.kl() for _, layer in _layers(inner)), torch.zeros((), device=nll.device))
        return nll + kl

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors({name + ".down": layer.down.weight for name, layer in _layers(model)})

    def export(self, model: nn.Module, directory: Path) -> None:
        export_npz(self.trainable_state(model), directory)
