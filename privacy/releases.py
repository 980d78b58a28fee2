"""One-off Gaussian releases of a client's data statistics, composed into its ledger.

Some methods need a client to release something about its data besides DP-SGD updates --
ICM-LoRA's *task vector*, the mean of the client's example embeddings. That is an extra
release and costs privacy. Here it is the Gaussian mechanism on a sum: every example's
vector is clipped to L2 norm ``clip`` (so adding or removing one example changes the sum
by at most ``clip``, the same add/remove adjacency as DP-SGD), Gaussian noise with standard
deviation ``sigma * clip`` is added to the sum, and the result is divided by the number of
examples (a count the client reports anyway as its FedAvg weight). This is exactly one
DP-SGD "step" with sample rate 1 and noise multiplier ``sigma``, so it is one ledger entry
``(sigma, 1.0, 1)`` and the run's accountant (PRV / RDP, :mod:`privacy.accounting`)
composes it with the client's DP-SGD steps -- no separate hand-made epsilon.

Budget. DP-SGD's sigma is normally calibrated so that the planned steps spend exactly the
target epsilon; a release on top would push the last round over it and the ledger would
refuse that round. :func:`calibrate_after` calibrates DP-SGD's sigma for the target with
the releases already in the history, and :func:`record_release` writes the release into
the ledger (calibrating first when the ledger is new), before the client's first DP-SGD
step.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from privacy.accounting import Calibration, HistoryEntry, calibrate_noise, epsilon_for
from privacy.ledger import Ledger, LedgerEntry

__all__ = ["calibrate_after", "clipped_noisy_mean", "release_entry", "release_epsilon", "record_release"]


def release_entry(sigma: float) -> HistoryEntry:
    """The ledger history entry of one Gaussian release of a clipped sum: (sigma, q=1, 1 step)."""
    return (float(sigma), 1.0, 1)


def release_epsilon(sigma: float, delta: float, accountant: str = "prv") -> tuple[float, str]:
    """Epsilon of one release on its own (for reports; the ledger composes it with DP-SGD)."""
    return epsilon_for([release_entry(sigma)], delta, accountant)


def clipped_noisy_mean(
    vectors: torch.Tensor, clip: float, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(sum_i clip_C(v_i) + N(0, (sigma C)^2 I)) / n`` for ``vectors`` (n, d); sigma=0: no noise.

    The noise comes from ``generator`` or, by default, from a generator seeded with 64
    bits of ``secrets`` (the server must not be able to regenerate it).
    """
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError("expected a non-empty (n, d) matrix of per-example vectors")
    v = vectors.detach().to(torch.float64)
    norms = v.norm(dim=1, keepdim=True)
    clipped = v * torch.clamp(clip / (norms + 1e-12), max=1.0)
    total = clipped.sum(0)
    if sigma > 0:
        gen = generator or torch.Generator().manual_seed(secrets.randbits(63))
        total = total + torch.randn(total.shape, generator=gen, dtype=torch.float64) * (sigma * clip)
    return (total / len(v)).to(torch.float32)


def calibrate_after(
    prior: Sequence[HistoryEntry], target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = "prv",
) -> Calibration:
    """DP-SGD's sigma such that ``prior`` releases plus ``steps`` steps at ``sample_rate``
    stay within ``target_epsilon`` (by :func:`epsilon_for`, the figure the ledger checks):
    :func:`calibrate_noise` with the releases as its prior history. ValueError if the prior
    alone already spends the target.
    """
    prior = tuple(prior)
    if prior:
        alone, _ = epsilon_for(prior, delta, accountant)
        if alone >= target_epsilon:
            raise ValueError(f"the releases alone spend epsilon={alone:.3f} >= the budget {target_epsilon:g}; "
                             f"raise their noise")
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant, prior=prior)


def record_release(
    path: Path, client: str, *, target_epsilon: float, delta: float, accountant: str, sigma: float,
    sample_rate: float, planned_steps: int, tag: str, payload: np.ndarray,
) -> Ledger:
    """Append one release (``(sigma, 1, 1)``, round 0 = before training) to the client's
    ledger at ``path`` and save it. A new ledger (no sigma yet) is first calibrated for
    ``planned_steps`` DP-SGD steps at ``sample_rate`` with the release included, so that the
    whole run fits the target; the ClientApp then keeps that sigma. Returns the ledger.
    """
    ledger = Ledger.load_or_new(path, None, client=client, target_epsilon=target_epsilon, delta=delta,
                                accountant=accountant)
    if ledger.noise_multiplier == 0.0 and not ledger.entries:
        plan = calibrate_after([release_entry(sigma)], target_epsilon, delta, sample_rate, planned_steps, accountant)
        ledger.noise_multiplier, ledger.sample_rate = plan.noise_multiplier, plan.sample_rate
        ledger.planned_steps, ledger.accountant = plan.planned_steps, plan.accountant
    digest = hashlib.sha256(np.ascontiguousarray(payload).tobytes()).hexdigest()
    entry = LedgerEntry(0, float(sigma), 1.0, 1, 0.0, replay_key=f"release:{tag}", output_hash=digest)
    ledger.entries.append(entry)
    entry.epsilon_after = epsilon_for(ledger.history, delta, ledger.accountant)[0]
    ledger.save(path)
    return ledger
