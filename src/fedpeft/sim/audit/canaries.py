"""White-box gradient ("Dirac") canaries trained through fedpeft's own DP-SGD path.

Each canary i is a fixed unit direction u_i in the trainable-parameter space (orthonormal
when m <= d, so canaries do not interfere; random unit vectors otherwise). Included canaries
take part in training like examples: in every step each flips its own Poisson coin at the
loader's rate q (a ChaCha20 stream keyed from the run's sampling key), and when it comes up
its per-sample gradient row ``C u_i`` is appended to every trainable parameter's
``p.grad_sample`` right before ``opt.step()``. Opacus then clips it (norm C: unchanged),
sums it with the real examples' clipped rows, adds the noise (fedpeft's
:class:`~fedpeft.privacy.dpsgd.SecretNoise`) and divides by the expected batch size, exactly as it
would a real example's.

Observation: the released noisy gradient of every step (what DP-SGD's accounting protects:
all iterates, a stronger adversary than the server, which sees one update per round).
``x[t, i] = <g_t * B / C, u_i>`` undoes Opacus's 1/B (``loss_reduction="mean"``) and the
clip, so an included canary adds 1 when sampled, on top of N(0, sigma^2) noise and the
real examples' projection. Scores: ``llr`` (default) sums the per-step log-likelihood ratio
of the subsampled Gaussian at the *claimed* sigma, ``log(1 - q + q exp((x - 1/2) / sigma^2))``,
which is the Neyman-Pearson score per step; ``sum`` is sum_t x[t, i].

``known_noise``: the auditor regenerates the noise from that RoundRandomness and subtracts
it (the attack a server can mount when the node's keys are derivable from what it knows).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.client.trainer import make_optimizer, tensorize
from fedpeft.config import RunConfig
from fedpeft.data.sources import TextDataset
from fedpeft.privacy.dpsgd import make_private
from fedpeft.privacy.randomness import ChaChaStream, RoundRandomness
from fedpeft.tasks.registry import task_for

__all__ = ["CanaryRun", "canary_scores", "train_with_canaries"]


@dataclass
class CanaryRun:
    """What one canary-audited training run produced."""

    projections: np.ndarray  # (steps, m): x[t, i] as in the module docstring
    included: np.ndarray  # (m,) bool: the canaries' membership bits
    sampled: np.ndarray  # (m,) int: how many steps each (included) canary was sampled in
    sample_rate: float
    steps: int
    dimension: int  # trainable parameters d
    orthonormal: bool
    seconds: float


def _directions(d: int, m: int, gen: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """(m, d) unit rows: orthonormal (QR of a Gaussian matrix) when m <= d, else random."""
    g = gen.standard_normal((d, m))
    if m <= d:
        q, _ = np.linalg.qr(g)
        return torch.from_numpy(np.ascontiguousarray(q.T)).float(), True
    g /= np.linalg.norm(g, axis=0, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(g.T)).float(), False


def train_with_canaries(
    model: nn.Module, plugin: AdapterPlugin, tokenizer, data: TextDataset, cfg: RunConfig,  # type: ignore[no-untyped-def]
    *, noise_multiplier: float, steps: int, canaries: int, rng: RoundRandomness, audit_seed: int,
    batch_size: int | None = None, known_noise: RoundRandomness | None = None,
) -> CanaryRun:
    """Train ``steps`` DP-SGD steps of ``model`` (adapter attached) on ``data`` with ``canaries``.

    ``noise_multiplier`` is the sigma the optimizer *uses* (a test may break it on purpose);
    ``rng`` keys the Poisson batches, the noise and the canaries' coins; ``audit_seed`` the
    canary directions and membership bits (the auditor's own choices). The loader batch is
    ``batch_size`` (default ``cfg.train.batch_size``): q = 1 / len(loader), as in training.
    """
    start = time.perf_counter()
    device = torch.device("cpu")
    model.to(device).train()
    torch.manual_seed(rng.dropout_seed)
    task_type = task_for(cfg)
    dataset = tensorize(tokenizer, data, cfg.model.max_length, task_type)
    loader = DataLoader(dataset, batch_size=min(batch_size or cfg.train.batch_size, len(dataset)))
    params = [p for p in model.parameters() if p.requires_grad]
    parts = make_private(model, make_optimizer(cfg, params), loader, noise_multiplier, cfg.privacy.clip, rng,
                         grad_sample_mode="hooks", secure_mode=False)
    net, opt, q, clip = parts.module, parts.optimizer, parts.sample_rate, cfg.privacy.clip
    shapes = [p.shape for p in opt.params]
    sizes = [p.numel() for p in opt.params]
    d = sum(sizes)
    gen = np.random.default_rng(audit_seed)
    directions, orthonormal = _directions(d, canaries, gen)
    included = gen.random(canaries) < 0.5
    coins = ChaChaStream(hmac.new(rng.sampling_key, b"fedpeft-canary-coins", hashlib.sha256).digest())
    oracle = known_noise.noise() if known_noise is not None else None
    scale = float(opt.expected_batch_size) if opt.loss_reduction == "mean" else 1.0
    proj = np.zeros((steps, canaries))
    sampled = np.zeros(canaries, dtype=np.int64)
    batches: Iterator[list[torch.Tensor]] = iter(())
    for t in range(steps):
        try:
            batch = dataset.as_batch(next(batches))
        except StopIteration:
            batches = iter(parts.loader)
            batch = dataset.as_batch(next(batches))
        chunks = task_type.chunks(batch, cfg.train.physical_batch_size)
        for j, chunk in enumerate(chunks):
            loss = plugin.loss(net, chunk, task_type)
            loss.backward()
            if j < len(chunks) - 1:
                opt.signal_skip_step(do_skip=True)
                opt.step()  # clip + accumulate this chunk
                opt.zero_grad(set_to_none=True)
        if not chunks:  # empty Poisson batch: still a noisy step
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        active = np.flatnonzero(included & (coins.uniform(canaries) < q))
        sampled[active] += 1
        rows = directions[torch.from_numpy(active)] * clip  # (k, d), each of norm C
        for p, piece, shape in zip(opt.params, rows.split(sizes, dim=1), shapes, strict=True):
            p.grad_sample = torch.cat([p.grad_sample, piece.reshape(len(active), *shape).to(p.dtype)])
        opt.step()  # Opacus: clip, sum, SecretNoise.add_noise, / expected batch size, update
        released = torch.cat([p.grad.detach().reshape(-1) for p in opt.params]) * (scale / clip)
        if oracle is not None and noise_multiplier > 0:  # the server-side attack: regenerate the noise and subtract it
            noise = torch.cat([oracle.gaussian_like(p, noise_multiplier * clip).reshape(-1) for p in opt.params])
            released = released - noise / clip
        proj[t] = (directions @ released).double().numpy()
        opt.zero_grad(set_to_none=True)
    net._close()
    model.eval()
    return CanaryRun(proj, included, sampled, q, steps, d, orthonormal, time.perf_counter() - start)


def canary_scores(run: CanaryRun, sigma: float, kind: str = "llr") -> np.ndarray:
    """One score per canary (higher: more likely included); ``sigma`` is the *claimed* sigma."""
    x = run.projections
    if kind == "sum" or run.sample_rate >= 1.0:
        return x.sum(axis=0)
    if kind != "llr":
        raise ValueError(f"unknown score {kind!r}; allowed: llr, sum")
    q = run.sample_rate
    llr = np.logaddexp(np.log1p(-q), np.log(q) + (x - 0.5) / max(sigma, 1e-12) ** 2)
    return llr.sum(axis=0)
