"""Client side of a method's one-off data release (ICM-LoRA's task vector).

A plugin with the :class:`~fedpeft.adapters.capabilities.DataRelease` capability
(``release_vectors(model, tokenizer, data, cfg) -> (n, d) tensor``, ``install_release(model,
task, vector)``) asks every client of a multi-task federation to
release once the clipped, noised mean of those per-example vectors
(:func:`fedpeft.privacy.releases.clipped_noisy_mean`; tag, clip and noise from
``plugin.release_params(cfg)``). :func:`ensure_release` runs before each round's training
(from :meth:`fedpeft.client.runtime.Runtime.activate`, which passes what it needs: this
module knows nothing of the runtime):

* first round of a client: compute the vectors, clip, add noise from a secret seed, record
  the release in the client's ledger (``(sigma, 1, 1)``; a new ledger is calibrated with it
  included, :func:`fedpeft.privacy.releases.record_release`), then store the released vector next
  to the ledger (``client-<id>.release-<tag>.npy``) -- in that order, so a crash in between
  can only over-count;
* later rounds: load the stored vector (re-sending a released value is post-processing:
  free); the noisy vector is never recomputed while that file exists.

Without DP (``privacy.epsilon = inf``) the vector is clipped but not noised, and there is no
ledger. The number of DP-SGD steps the ledger is calibrated for uses the same formulas as the
ClientApp (:func:`fedpeft.client.trainer.local_steps`, sample rate ``1 / batches per epoch``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.capabilities import DataRelease
from fedpeft.client.trainer import local_steps
from fedpeft.config import RunConfig
from fedpeft.data.sources import TextDataset
from fedpeft.io import atomic_write
from fedpeft.privacy.plan import sample_rate_for
from fedpeft.privacy.releases import clipped_noisy_mean, record_release, release_epsilon

__all__ = ["ensure_release"]

log = logging.getLogger("fedpeft.client")


def ensure_release(
    plugin: DataRelease, cfg: RunConfig, tokenizer: Any, model: nn.Module,
    client_data: Callable[[], TextDataset], task: str, ledger_dir: Path, client_id: str,
) -> np.ndarray:
    """Client ``client_id``'s released vector (computed from ``client_data()``, accounted in
    its ledger in ``ledger_dir`` and stored there on first use), installed into ``model``
    with ``plugin.install_release`` for ``task``."""
    tag, clip, sigma = plugin.release_params(cfg)
    path = ledger_dir / f"client-{client_id}.release-{tag}.npy"
    if path.is_file():
        vector = np.load(path)
    else:
        data = client_data()
        feats = plugin.release_vectors(model, tokenizer, data, cfg)
        noise = sigma if cfg.privacy.enabled else 0.0
        vector = clipped_noisy_mean(feats, clip, noise).numpy()
        if cfg.privacy.enabled:
            n = len(data)
            q = sample_rate_for(n, cfg.train.batch_size)  # as the ClientApp's calibration
            ledger = record_release(
                ledger_dir / f"client-{client_id}.json", client_id,
                target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
                sigma=sigma, sample_rate=q, planned_steps=local_steps(cfg, n) * cfg.train.rounds, tag=tag,
                payload=vector,
            )
            alone, acc = release_epsilon(sigma, cfg.privacy.delta, ledger.accountant)
            log.info("client %s: released its %s (clip %g, sigma %g: epsilon %.3f alone, %s); ledger now at "
                     "epsilon=%.3f; DP-SGD sigma=%.4f", client_id, tag, clip, sigma, alone, acc,
                     ledger.entries[-1].epsilon_after, ledger.noise_multiplier)
        atomic_write(path, lambda fh: np.save(fh, vector))
    plugin.install_release(model, task, torch.as_tensor(vector))
    return vector
