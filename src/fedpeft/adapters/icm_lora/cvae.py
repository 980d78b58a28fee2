"""A small conditional VAE that maps a condition vector to a flattened weight vector.

Used by ICM-LoRA (:mod:`fedpeft.adapters.icm_lora`) on the server: the condition is a task vector,
the target the flattened LoRA B matrices of every adapted layer. Encoder
``q(z | P y, c)`` (P a fixed random projection to at most 256 dimensions), decoder ``p(y | z, c)``, both one-hidden-layer MLPs sharing a condition
embedding ``tanh(W_c c)``; loss = mean squared reconstruction error + ``beta`` * KL to N(0, I)
(per latent dimension, averaged over samples). Generation decodes the prior mean ``z = 0``
(deterministic). Conditions and targets are standardised with the training set's mean and
one global scale each (few samples: per-coordinate scales would be noise), and the
generated vector is mapped back. Training is full-batch Adam, seeded: the same pairs give
the same generator on every machine.

Why so small: the server sees a handful of (task vector, adapter) pairs per round (one per
client, plus snapshots of earlier rounds), so anything larger would only memorise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CVAEConfig", "ConditionalVAE"]


@dataclass(frozen=True)
class CVAEConfig:
    hidden: int = 64
    latent: int = 8
    cond_dim: int = 32
    sketch: int = 256
    beta: float = 0.05
    steps: int = 400
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


class ConditionalVAE(nn.Module):
    """``fit(C, Y)`` then ``generate(c)``; see the module docstring."""

    c_mean: torch.Tensor
    y_mean: torch.Tensor
    scales: torch.Tensor
    sketch: torch.Tensor

    def __init__(self, d_cond: int, d_out: int, cfg: CVAEConfig = CVAEConfig()) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.cond = nn.Linear(d_cond, cfg.cond_dim)
        # the encoder reads a fixed random projection of y (it only has to summarise y into z)
        self.sketch_dim = min(d_out, cfg.sketch)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.register_buffer("sketch", torch.randn(d_out, self.sketch_dim, generator=gen) / self.sketch_dim ** 0.5)
        self.enc = nn.Linear(self.sketch_dim + cfg.cond_dim, cfg.hidden)
        self.mu = nn.Linear(cfg.hidden, cfg.latent)
        self.logvar = nn.Linear(cfg.hidden, cfg.latent)
        self.dec = nn.Linear(cfg.latent + cfg.cond_dim, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, d_out)
        self.register_buffer("c_mean", torch.zeros(d_cond))
        self.register_buffer("y_mean", torch.zeros(d_out))
        self.register_buffer("scales", torch.ones(2))  # condition scale, target scale
        self.last_loss = float("nan")

    def _embed(self, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.cond((c - self.c_mean) / self.scales[0]))

    def decode(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.dec(torch.cat([z, e], dim=-1))))

    def forward(self, y: torch.Tensor, c: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, KL) for standardised targets ``y`` and raw conditions ``c``."""
        e = self._embed(c)
        h = F.relu(self.enc(torch.cat([y @ self.sketch, e], dim=-1)))
        mu, logvar = self.mu(h), self.logvar(h).clamp(-8, 8)
        z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
        recon = F.mse_loss(self.decode(z, e), y)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean() / mu.shape[-1]
        return recon, kl

    def fit(self, conditions: torch.Tensor, targets: torch.Tensor) -> float:
        """Train on (m, d_cond) conditions and (m, d_out) targets; returns the final loss."""
        c, y = conditions.detach().float(), targets.detach().float()
        with torch.no_grad():
            self.c_mean.copy_(c.mean(0))
            self.y_mean.copy_(y.mean(0))
            c_scale = (c - self.c_mean).pow(2).mean().sqrt().clamp(min=1e-8)
            y_scale = (y - self.y_mean).pow(2).mean().sqrt().clamp(min=1e-8)
            self.scales.copy_(torch.stack([c_scale, y_scale]))
        ys = (y - self.y_mean) / self.scales[1]
        opt = torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.train()
        loss = torch.zeros(())
        for _ in range(self.cfg.steps):
            opt.zero_grad()
            recon, kl = self(ys, c, gen)
            loss = recon + self.cfg.beta * kl
            loss.backward()
            opt.step()
        self.eval()
        self.last_loss = float(loss.detach())
        return self.last_loss

    @torch.no_grad()
    def generate(self, conditions: torch.Tensor) -> torch.Tensor:
        """Decoded prior mean (z = 0) for (m, d_cond) or (d_cond,) conditions, in target units."""
        c = conditions.float()
        single = c.ndim == 1
        e = self._embed(c[None] if single else c)
        y = self.decode(torch.zeros(len(e), self.cfg.latent), e) * self.scales[1] + self.y_mean
        return y[0] if single else y
