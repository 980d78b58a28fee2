"""DP-SGD with Opacus: wrap model, optimizer and data loader the one correct way.

Order matters with PEFT: the adapter is attached and frozen parts frozen *before*
Opacus wraps the model, and the optimizer is built over the trainable parameters only, so
per-sample gradients exist exactly for what trains (wrapping in the wrong order silently
trains nothing or leaks frozen tensors into the optimizer). Sampling is Poisson (the
accountant's assumption) and the sample rate is the one the loader actually uses,
``1 / len(data_loader)``, which is what the caller must calibrate with and record.

Randomness. Opacus's own Poisson sampler and noise draw from torch generators that a
caller seeds (or that are unseeded); here both come from the node's secret instead
(:mod:`fedpeft.privacy.randomness`): the Poisson batches from a ChaCha20 stream
(:class:`~fedpeft.privacy.randomness.PoissonBatchSampler`) and the Gaussian noise from another
(:class:`SecretNoise` mixed into Opacus's optimizer class, replacing only ``add_noise``;
clipping, accumulation and scaling stay Opacus's code). Nothing the server knows can seed
either. ``secure_mode`` adds Opacus's floating-point-attack defence (four draws summed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from fedpeft.privacy.randomness import ChaChaStream, PoissonBatchSampler, RoundRandomness

__all__ = ["PrivateParts", "SecretNoise", "PoissonLoader", "loader_sample_rate", "make_private"]


@dataclass
class PrivateParts:
    module: GradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    sample_rate: float  # the Poisson rate the loader samples at (what the ledger records)


def loader_sample_rate(loader: DataLoader) -> float:
    """The Poisson sample rate Opacus derives from ``loader``: 1 / len(loader)."""
    return 1.0 / len(loader)


class SecretNoise:
    """Mixin for an Opacus DP optimizer: the Gaussian noise comes from ``noise_stream``
    (a CSPRNG keyed by the node's secret) instead of a torch generator."""

    noise_stream: ChaChaStream
    secure_noise: bool

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm  # type: ignore[attr-defined]
        for p in self.params:  # type: ignore[attr-defined]
            _check_processed_flag(p.summed_grad)
            if std > 0:
                noise = self.noise_stream.gaussian_like(p.summed_grad, std, self.secure_noise)
                p.grad = (p.summed_grad + noise).view_as(p)
            else:
                p.grad = p.summed_grad.clone().view_as(p)
            _mark_as_processed(p.summed_grad)


_CLASSES: dict[type, type] = {}


def _secret_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"SecretNoise{base.__name__}", (SecretNoise, base), {})
    return _CLASSES[base]


class PoissonLoader(DataLoader):
    """Opacus's ``DPDataLoader`` (Poisson batches, empty batches allowed, ``sample_rate``
    attribute) with the CSPRNG sampler :class:`~fedpeft.privacy.randomness.PoissonBatchSampler`."""

    def __init__(self, dataset: Any, sample_rate: float, stream: ChaChaStream) -> None:
        first = dataset[0]
        collate = wrap_collate_with_empty(collate_fn=default_collate, batch_first=True, rand_on_empty=False,
                                          sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                          dtypes=[dtype_safe(x) for x in first])
        super().__init__(dataset, batch_sampler=PoissonBatchSampler(len(dataset), sample_rate, stream),
                         collate_fn=collate)
        self.sample_rate = sample_rate


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    rng: RoundRandomness,
    grad_sample_mode: str = "hooks",
    secure_mode: bool = False,
) -> PrivateParts:
    """Opacus ``make_private`` with Poisson sampling at ``1 / len(loader)`` and noise from ``rng``.

    The engine's own accountant is unused (the client's :class:`fedpeft.privacy.ledger.Ledger` is the
    record of what was spent); ``loader`` only defines the dataset and the sample rate.
    """
    if not isinstance(rng, RoundRandomness):
        raise TypeError("make_private needs the node's RoundRandomness (fedpeft.privacy.randomness); a seed is not allowed")
    with warnings.catch_warnings():
        # Opacus warns that its secure_mode is off: the CSPRNG here replaces it.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        module, dp_opt, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
        )
    sample_rate = loader_sample_rate(loader)
    cls = _secret_class(get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode))
    secret_opt = cls(optimizer=dp_opt.original_optimizer, noise_multiplier=noise_multiplier,
                     max_grad_norm=max_grad_norm, expected_batch_size=dp_opt.expected_batch_size,
                     loss_reduction=dp_opt.loss_reduction)
    secret_opt.noise_stream, secret_opt.secure_noise = rng.noise(), secure_mode
    return PrivateParts(module, secret_opt, PoissonLoader(loader.dataset, sample_rate, rng.sampling()), sample_rate)
