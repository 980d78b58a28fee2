"""One-off Gaussian releases of a client's data statistics, composed into its ledger.

Some methods need a client to release something about its data besides DP-SGD updates --
ICM-LoRA's *task vector*, the mean of the client's example embeddings. That is an extra
release and costs privacy. Here it is the Gaussian mechanism on a sum: every example's
vector is clipped to L2 norm ``clip``, Gaussian noise with standard deviation
``sigma * clip`` is added to the sum, and the result is divided by the number of examples n.

Sensitivity. Neighbouring datasets are *replace-one* (one example substituted), because n
is public: it is the client's FedAvg weight and fixes its sample rate. Substituting one
example moves the clipped sum by up to ``2 * clip`` (one clipped vector out, another in).
That factor 2 is the accountant's business, not ours: the release is one ledger entry
``(sigma, q=1, 1 step)`` and dp-accounting's PLD under REPLACE_ONE accounts a q = 1
Gaussian exactly as a Gaussian of sensitivity 2 (:mod:`fedpeft.privacy.accounting`), composed with
the client's DP-SGD steps -- no separate hand-made epsilon. Dividing by n is
post-processing with a public constant, so it costs nothing and needs no noise of its own.

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

from fedpeft.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_RELATION,
    Calibration,
    HistoryEntry,
    calibrate_noise,
    epsilon_for,
)
from fedpeft.privacy.ledger import Ledger, LedgerEntry

__all__ = ["calibrate_after", "clipped_noisy_mean", "release_entry", "release_epsilon", "record_release"]


def release_entry(sigma: float) -> HistoryEntry:
    """The ledger history entry of one Gaussian release of a clipped sum: (sigma, q=1, 1 step)."""
    return (float(sigma), 1.0, 1)


def release_epsilon(sigma: float, delta: float, accountant: str = DEFAULT_ACCOUNTANT,
                    relation: str = DEFAULT_RELATION) -> tuple[float, str]:
    """Epsilon of one release on its own (for reports; the ledger composes it with DP-SGD)."""
    return epsilon_for([release_entry(sigma)], delta, accountant, relation)


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
    accountant: str = DEFAULT_ACCOUNTANT, relation: str = DEFAULT_RELATION,
) -> Calibration:
    """DP-SGD's sigma such that ``prior`` releases plus ``steps`` steps at ``sample_rate``
    stay within ``target_epsilon`` (by :func:`epsilon_for`, the figure the ledger checks):
    :func:`calibrate_noise` with the releases as its prior history. ValueError if the prior
    alone already spends the target.
    """
    prior = tuple(prior)
    if prior:
        alone, _ = epsilon_for(prior, delta, accountant, relation)
        if alone >= target_epsilon:
            raise ValueError(f"the releases alone spend epsilon={alone:.3f} >= the budget {target_epsilon:g}; "
                             f"raise their noise")
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant, prior=prior, relation=relation)


def record_release(
    path: Path, client: str, *, target_epsilon: float, delta: float, accountant: str, sigma: float,
    sample_rate: float, planned_steps: int, tag: str, payload: np.ndarray, relation: str = DEFAULT_RELATION,
) -> Ledger:
    """Append one release (``(sigma, 1, 1)``, round 0 = before training) to the client's
    ledger at ``path`` and save it. A new ledger (no sigma yet) is first calibrated for
    ``planned_steps`` DP-SGD steps at ``sample_rate`` with the release included, so that the
    whole run fits the target; the ClientApp's :meth:`Ledger.ensure_plan` then keeps that
    sigma (the plan covers ``planned_steps`` after the release). On a ledger that already
    has a plan the release eats into it and the next ``ensure_plan`` re-calibrates.
    Returns the ledger.
    """
    ledger = Ledger.load_or_new(path, None, client=client, target_epsilon=target_epsilon, delta=delta,
                                accountant=accountant, relation=relation)
    new = ledger.noise_multiplier == 0.0 and not ledger.entries
    if new:
        plan = calibrate_after([release_entry(sigma)], target_epsilon, delta, sample_rate, planned_steps, accountant,
                               relation)
        ledger.noise_multiplier, ledger.sample_rate = plan.noise_multiplier, plan.sample_rate
        ledger.planned_steps = plan.planned_steps
    digest = hashlib.sha256(np.ascontiguousarray(payload).tobytes()).hexdigest()
    entry = LedgerEntry(0, float(sigma), 1.0, 1, 0.0, replay_key=f"release:{tag}", output_hash=digest)
    ledger.entries.append(entry)
    entry.epsilon_after, entry.accountant = ledger.epsilon()
    if new:
        ledger.plan_offset = ledger.total_steps
    ledger.save(path)
    return ledger
