"""Client side of a personalised evaluation (FedSA-LoRA's B stays home: the server cannot score it).

A plugin with the :class:`~fedpeft.adapters.capabilities.PersonalEval` capability and a
``fraction`` > 0 has every client

* hold ``fraction`` of its examples out of training for the whole run (:func:`split_held_out`;
  the split is a seeded permutation of indices, the seed made of the run's seed and the
  client id -- public values: which *positions* are held out says nothing of the data);
* in the **last round, before training**, install the global state and its own local state
  (for FedSA-LoRA: the averaged A and head with its own B -- the paper's personalised model,
  as it stands after round ``rounds - 1``) and compute the accuracy on the held-out examples
  (:func:`personal_accuracy`);
* send it in the reply (:data:`fedpeft.wire.PERSONAL_ACCURACY`, with the public count
  :data:`fedpeft.wire.PERSONAL_EXAMPLES`).

**Every value a reply carries is a release.** Under DP the accuracy is released with the
Gaussian mechanism of :mod:`fedpeft.privacy.releases`: the sum over held-out examples of
``correct - 1/2`` (each in [-1/2, 1/2]: clip 1/2) plus ``N(0, (sigma/2)^2)``, divided by the
public count, plus 1/2. Replace-one neighbours move that sum by at most 1 = 2 x clip, which is
exactly how the accountant reads a ``(sigma, q=1, 1 step)`` entry
(:func:`fedpeft.privacy.releases.release_entry`). The release is

* **planned**: from round 1 the client's ledger reserves it (:meth:`Ledger.ensure_plan`'s
  ``reserved``), so DP-SGD's sigma is calibrated for the training steps *and* this release
  and the whole run stays within the target; every round's budget check counts it;
* **recorded** in the ledger (round = the last round, replay key ``personal-eval:<round's
  key>``, output hash of the released float) before the reply is built, and
* **checked** when the reply is built (:func:`check_accounted`): a DP reply carrying an
  accuracy that no ledger entry of this round covers is refused, never sent.

The held-out examples never train, so the release is on data disjoint from DP-SGD's; the
ledger still composes it with every DP-SGD step (sequential composition over the client's
whole dataset: an over-count, never an under-count). Without DP the exact accuracy is sent
(nothing is protected there, as for the training loss). The noise comes from 64 bits of
``secrets`` (the server cannot regenerate it); a replayed round re-sends the stored value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

import fedpeft.wire as wire
from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import PersonalEval, PersonalEvalParams
from fedpeft.config import RunConfig
from fedpeft.data.sources import TextDataset
from fedpeft.privacy.accounting import HistoryEntry
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.releases import clipped_noisy_mean, release_entry
from fedpeft.tasks.base import TaskType

__all__ = ["CLIP", "check_accounted", "eval_params", "personal_accuracy", "record_eval", "release_digest",
           "reserved", "split_held_out"]

CLIP = 0.5  # each held-out example contributes correct - 1/2, in [-1/2, 1/2]


def eval_params(plugin: AdapterPlugin, cfg: RunConfig) -> PersonalEvalParams | None:
    """The run's personalised evaluation, or None (not this method, or ``fraction`` 0)."""
    if not isinstance(plugin, PersonalEval):
        return None
    params = plugin.personal_eval_params(cfg)
    return params if params.fraction > 0 else None


def split_held_out(data: TextDataset, fraction: float, run_seed: int, client_id: str
                   ) -> tuple[TextDataset, TextDataset]:
    """(training part, held-out part) of a client's data: ``round(fraction * n)`` examples (at
    least 1, at most n - 1) at positions drawn with a seed of public values (module doc)."""
    n = len(data)
    if n < 2:
        raise ValueError("a personalised evaluation needs at least 2 examples on the client")
    held = min(n - 1, max(1, round(fraction * n)))
    seed = int(hashlib.sha256(f"personal-eval|{run_seed}|{client_id}".encode()).hexdigest()[:15], 16)
    order = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(order[held:])), data.subset(np.sort(order[:held]))


def reserved(cfg: RunConfig, params: PersonalEvalParams | None) -> tuple[HistoryEntry, ...]:
    """The releases the ledger's plan must still cover: the last round's evaluation, under DP."""
    return (release_entry(params.sigma),) if params is not None and cfg.privacy.enabled else ()


def personal_accuracy(task_type: TaskType, model: nn.Module, tokenizer: Any, held: TextDataset, cfg: RunConfig,
                      device: torch.device, sigma: float | None) -> float:
    """Accuracy of ``model`` (as installed) on ``held``; with ``sigma`` the Gaussian release of
    the module doc, else the exact value."""
    ev = task_type.evaluate(model, tokenizer, held, cfg.model.max_length, device)
    n = int(ev["examples"])
    correct = int(round(float(ev["accuracy"]) * n))
    if sigma is None:
        return correct / n
    signs = torch.cat([torch.full((correct, 1), CLIP), torch.full((n - correct, 1), -CLIP)])
    return float(clipped_noisy_mean(signs, CLIP, sigma)) + CLIP


def release_digest(value: float) -> str:
    """The ledger's output hash of a released accuracy."""
    return hashlib.sha256(repr(float(value)).encode()).hexdigest()


def record_eval(ledger: Ledger, server_round: int, replay_key: str, value: float, sigma: float) -> float:
    """Record the release in ``ledger`` (it is no longer reserved); the epsilon spent after it."""
    eps = ledger.record(server_round, 1, f"personal-eval:{replay_key}", release_digest(value),
                        noise_multiplier=sigma, sample_rate=1.0)
    ledger.reserved = []
    return eps


def check_accounted(metrics: dict[str, Any] | Any, ledger: Ledger | None, server_round: int) -> None:
    """Raise :class:`fedpeft.wire.ProtocolError` if a DP reply's accuracy is not covered by a
    ledger entry of ``server_round`` with its output hash (module doc); the other keys must be
    :data:`fedpeft.wire.DP_METRICS`."""
    rest = {k: v for k, v in metrics.items() if k not in wire.PERSONAL_METRICS}
    wire.check_dp_metrics(rest)
    if wire.PERSONAL_ACCURACY not in metrics:
        return
    digest = release_digest(float(metrics[wire.PERSONAL_ACCURACY]))
    if ledger is None or not any(e.round == server_round and e.output_hash == digest and e.sample_rate == 1.0
                                 for e in ledger.entries):
        raise wire.ProtocolError(f"a DP reply may carry {wire.PERSONAL_ACCURACY} only as a release recorded in the "
                                 f"client's ledger for round {server_round}; it is not")
