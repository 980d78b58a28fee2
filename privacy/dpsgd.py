"""DP-SGD with Opacus: wrap model, optimizer and data loader the one correct way.

Order matters with PEFT: the adapter is attached and frozen parts frozen *before*
Opacus wraps the model, and the optimizer is built over the trainable parameters only, so
per-sample gradients exist exactly for what trains (wrapping in the wrong order silently
trains nothing or leaks frozen tensors into the optimizer). Sampling is Poisson (the
accountant's assumption) and the sample rate is the one Opacus's loader actually uses,
``1 / len(data_loader)``, which is what the caller must calibrate with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["PrivateParts", "loader_sample_rate", "make_private"]


@dataclass
class PrivateParts:
    module: GradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader


def loader_sample_rate(loader: DataLoader) -> float:
    """The Poisson sample rate Opacus will derive from ``loader``: 1 / len(loader)."""
    return 1.0 / len(loader)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
    grad_sample_mode: str = "hooks",
) -> PrivateParts:
    """Opacus ``make_private`` with Poisson sampling; the engine's own accountant is unused
    (the client's :class:`privacy.ledger.Ledger` is the record of what was spent)."""
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (a deliberate speed choice, see README).
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        module, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        )
    return PrivateParts(module, dp_opt, dp_loader)
