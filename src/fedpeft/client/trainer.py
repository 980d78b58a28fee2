"""Local training of one client for one round, with or without DP-SGD.

The client's examples are encoded once by the run's task type (padded to ``max_length``;
:meth:`fedpeft.tasks.base.TaskType.encode`) into a :class:`~fedpeft.data.batching.BatchDataset`.
Batches are opaque here: the task type cuts each logical batch into physical chunks of at
most ``physical_batch_size`` examples, sorted by length and each trimmed to its own longest
sequence (:meth:`~fedpeft.tasks.base.TaskType.chunks`): on Rotten Tomatoes (median 26
tokens, cap 40) this processes about a third fewer tokens than padding every chunk to the
batch maximum, and it changes nothing in the maths -- the gradient of a logical batch is the
same sum over examples -- and the plugin's loss (by default the task type's) reads them.

With DP, logical batches are Poisson samples at the rate ``1 / len(loader)`` (the rate the
ledger records, returned as ``LocalResult.sample_rate``); every
chunk but the last calls ``signal_skip_step`` (as Opacus's own ``BatchMemoryManager``
does), so per-sample gradients are clipped and accumulated across chunks and noise is
added once per logical batch. One *step* is one logical batch (one noisy optimizer
update), which is what the ledger counts.

Randomness: the Poisson batches, the DP noise and the dropout masks of a DP round come from
the node's :class:`~fedpeft.privacy.randomness.RoundRandomness` (keys derived from the node secret),
never from a seed the server knows. Without DP the loader's shuffling and dropout use a
plain seed (there is no guarantee to protect).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch, BatchDataset, batch_len, length_buckets, to_device
from fedpeft.data.sources import TextDataset
from fedpeft.privacy.dpsgd import loader_sample_rate, make_private
from fedpeft.privacy.randomness import RoundRandomness
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.registry import task_for

# Opacus's hooks fire on modules whose inputs need no grad (frozen embeddings); harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

__all__ = ["LocalResult", "build_loader", "length_buckets", "local_steps", "make_optimizer", "proximal_term",
           "train_local"]


@dataclass(frozen=True)
class LocalResult:
    steps: int
    examples: int  # distinct examples held by the client (FedAvg weight)
    samples_seen: int  # examples processed (sum of batch sizes)
    loss_first: float
    loss_mean: float
    loss_last: float
    seconds: float
    sample_rate: float = 1.0  # DP: the Poisson rate the loader sampled at; else 1 / batches per epoch


def tensorize(tokenizer: Any, data: TextDataset, max_length: int, task_type: TaskType) -> BatchDataset:
    """All of ``data`` encoded by ``task_type`` (padded to ``max_length``) as a loader's dataset."""
    return BatchDataset(task_type.encode(tokenizer, data, max_length))


def build_loader(dataset: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    """Loader whose length defines the DP sample rate (1/len) and the epoch."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=gen, drop_last=False)


def local_steps(cfg: RunConfig, n_examples: int) -> int:
    """Optimizer steps per round: ``local_steps`` if set, else local_epochs x batches."""
    if cfg.train.local_steps:
        return cfg.train.local_steps
    per_epoch = math.ceil(n_examples / min(cfg.train.batch_size, n_examples))
    return max(1, math.ceil(cfg.train.local_epochs * per_epoch))


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9)
    return torch.optim.Adam(params, lr=cfg.train.lr)


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader


def _progress(total: int, desc: str) -> tqdm:
    disable = os.environ.get("FEDPEFT_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, mininterval=2.0, disable=disable)


def _dp_step(net: GradSampleModule, opt: DPOptimizer, plugin: AdapterPlugin, task_type: TaskType, batch: Batch, physical: int,
             device: torch.device) -> tuple[float, int]:
    """One DP-SGD step on one logical (Poisson) batch: per-sample gradients clipped and
    accumulated over its physical chunks, noise added once; (mean loss, examples)."""
    n = batch_len(batch)
    chunks = task_type.chunks(batch, physical)
    step_loss = 0.0
    for j, chunk in enumerate(chunks):
        if j < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)  # accumulate; noise once per logical batch
        loss = plugin.loss(net, to_device(chunk, device), task_type)
        loss.backward()
        step_loss += float(loss.detach()) * batch_len(chunk) / n
        if j < len(chunks) - 1:
            opt.step()  # clips and accumulates this chunk's per-sample gradients only
            opt.zero_grad(set_to_none=True)  # keeps the accumulated sum, drops grad_sample
    if not chunks:
        # An empty Poisson batch is still a (noise-only) DP step; BERT cannot run on zero
        # rows, so hand Opacus the zero per-sample gradients it would have produced.
        for param in opt.params:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    opt.step()  # last chunk: one noisy update for the whole logical batch
    opt.zero_grad(set_to_none=True)
    return step_loss, n


def proximal_term(params: list[nn.Parameter], mu: float) -> Callable[[], None] | None:
    """FedProx's proximal gradient, or None when ``mu`` is 0: a function that adds
    ``mu * (w - w0)`` to every trainable tensor's gradient, ``w0`` the values now (the state
    the round started from: the global state the client installed).

    Under DP-SGD it runs after Opacus has clipped, summed, noised and scaled the per-sample
    gradients (Opacus's step hook), just before the optimiser's update. The term depends on
    no example -- only on the released global state and the current weights, themselves
    post-processing of DP steps -- so it costs no privacy, and clipping it with the data
    gradients would shrink and bias it (Li et al.'s proximal pull, not a clipped one)."""
    if mu <= 0:
        return None
    anchor = [p.detach().clone() for p in params]

    def add() -> None:
        with torch.no_grad():
            for p, w0 in zip(params, anchor, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p.detach() - w0, alpha=mu)

    return add


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, plugin: AdapterPlugin, task_type: TaskType,
                batch: Batch, physical: int, device: torch.device,
                proximal: Callable[[], None] | None = None) -> tuple[float, int]:
    """One non-DP step, the gradient accumulated over the physical chunks (plus FedProx's
    proximal gradient when given); (mean loss, examples)."""
    n = batch_len(batch)
    optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    for chunk in task_type.chunks(batch, physical):
        # gradient accumulation: each chunk weighted by its share of the logical batch
        loss = plugin.loss(model, to_device(chunk, device), task_type) * (batch_len(chunk) / n)
        loss.backward()
        step_loss += float(loss.detach())
    if proximal is not None:
        proximal()
    optimizer.step()
    return step_loss, n


def train_local(
    model: nn.Module,
    plugin: AdapterPlugin,
    tokenizer,  # type: ignore[no-untyped-def]
    data: TextDataset,
    cfg: RunConfig,
    steps: int,
    device: torch.device,
    noise_multiplier: float | None,
    seed: int | RoundRandomness,
    desc: str = "local training",
    encoded: Batch | None = None,
) -> LocalResult:
    """Run ``steps`` optimizer steps on ``data``; DP-SGD when ``noise_multiplier`` is set.

    ``model`` must already carry the adapter (``plugin.attach``) and the global state.
    ``seed`` is the node's :class:`RoundRandomness` for a DP round (required: a DP round
    refuses a plain integer seed) and an integer without DP. ``encoded``: ``data`` already
    encoded by the task type (:mod:`fedpeft.client.token_cache`); else it is encoded here.
    """
    if noise_multiplier is not None and not isinstance(seed, RoundRandomness):
        raise TypeError("DP-SGD needs the node's RoundRandomness, not an integer seed (the server may know it)")
    model.to(device).train()
    task_type = task_for(cfg)
    dataset = BatchDataset(encoded) if encoded is not None else tensorize(tokenizer, data, cfg.model.max_length,
                                                                           task_type)
    plain_seed = seed.dropout_seed if isinstance(seed, RoundRandomness) else int(seed)
    loader = build_loader(dataset, cfg.train.batch_size, plain_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    torch.manual_seed(plain_seed)  # dropout masks: from the node's secret under DP
    sample_rate = loader_sample_rate(loader)
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    bar = _progress(steps, desc)
    physical = cfg.train.physical_batch_size
    proximal = proximal_term(params, cfg.train.proximal_mu)
    if noise_multiplier is not None:
        assert isinstance(seed, RoundRandomness)
        parts = make_private(model, optimizer, loader, noise_multiplier, cfg.privacy.clip, seed,
                             secure_mode=cfg.privacy.secure_mode)
        if proximal is not None:  # after clipping and noise, before the update (proximal_term)
            parts.optimizer.attach_step_hook(lambda _opt: proximal())
        sample_rate, stream = parts.sample_rate, _cycle(parts.loader)
        for _ in range(steps):
            step_loss, n = _dp_step(parts.module, parts.optimizer, plugin, task_type, dataset.as_batch(next(stream)),
                                    physical, device)
            if n:
                losses.append(step_loss)
                seen += n
            bar.update(1)
        parts.module._close()  # remove Opacus hooks so the model can be reused and exported
    else:
        stream = _cycle(loader)
        for _ in range(steps):
            step_loss, n = _plain_step(model, optimizer, plugin, task_type, dataset.as_batch(next(stream)), physical,
                                       device, proximal)
            losses.append(step_loss)
            seen += n
            bar.update(1)
    bar.close()
    model.eval()
    if not losses:
        losses = [float("nan")]
    return LocalResult(
        steps=steps,
        examples=len(data),
        samples_seen=seen,
        loss_first=losses[0],
        loss_mean=sum(losses) / len(losses),
        loss_last=losses[-1],
        seconds=time.perf_counter() - start,
        sample_rate=sample_rate,
    )


__all__ += ["loader_sample_rate", "tensorize"]
