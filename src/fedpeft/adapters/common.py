"""Helpers that several adapter methods share, in one place.

Each method module holds its own layer and plugin; what more than one method needs lives
here, so that no method module has to import another one for a helper (the only arrows
between method modules are to a true base: ``ffa_lora`` builds on ``lora``, the DeltaLinear
methods on ``delta_linear``). Nothing here imports another module of :mod:`fedpeft.adapters`.

* state arithmetic: :func:`weighted_mean` (the default aggregation rule), :func:`rank_slice`
  (a heterogeneous-rank client's part of a LoRA state),
  :func:`grouped_aggregate` (a rule applied per group of clients that sent the same tensors:
  multi-task runs) and :func:`hash_tensors` (the frozen-tensor fingerprint);
* model surgery: :func:`replace_submodule`, :func:`target_linears`, :func:`replace_targets`,
  :func:`freeze_all_but_head` (heads: :func:`fedpeft.tasks.registry.head_prefixes`);
* determinism: :func:`seeded_normal` (seeded frozen factors, bit-identical everywhere) and
  :func:`single_threaded` (decompositions of W0 with the same bits in every process);
* export: :func:`export_npz`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedpeft.config import ConfigError
from fedpeft.tasks.registry import head_prefixes

__all__ = [
    "NDArrays", "export_npz", "freeze_all_but_head", "grouped_aggregate", "hash_tensors",
    "rank_slice", "replace_submodule", "replace_targets", "seeded_normal", "single_threaded", "target_linears", "weighted_mean",
]

NDArrays = dict[str, np.ndarray]


# ---- state arithmetic ------------------------------------------------------------------------
def weighted_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> NDArrays:
    """Key-wise weighted mean in float64, returned in each key's original dtype."""
    if not states:
        raise ValueError("weighted_mean needs at least one state")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    out: NDArrays = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for wi, state in zip(w, states, strict=True):
            acc += wi * state[key].astype(np.float64)
        out[key] = acc.astype(states[0][key].dtype)
    return out


def rank_slice(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` rank components of a LoRA state: ``lora_B[:, :rank]``, ``lora_A[:rank]``,
    other tensors whole (what a heterogeneous-rank client sends; the server zero-pads it back,
    :func:`fedpeft.adapters.ffa_lora_hetero.pad_state`)."""
    return {k: (v[:, :rank] if "lora_B" in k else v[:rank] if "lora_A" in k else v) for k, v in state.items()}


class Aggregator(Protocol):
    """Anything with a plugin's aggregation rule (every :class:`~fedpeft.adapters.base.AdapterPlugin`)."""

    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays: ...


def grouped_aggregate(
    plugin: Aggregator, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
    previous: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
) -> NDArrays:
    """``plugin.aggregate`` per group of tensors sent by the same clients; tensors of
    ``current`` (the global state sent out) that nobody sent are carried over unchanged.

    So a shared tensor is averaged over every client and a task-owned one only within its
    task's group -- exact wherever the plugin's rule is (a key-wise weighted mean is)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key in sorted({k for s in states for k in s}):
        senders = tuple(i for i, s in enumerate(states) if key in s)
        groups.setdefault(senders, []).append(key)
    out: NDArrays = {k: np.array(v, copy=True) for k, v in current.items()}
    for senders, keys in groups.items():
        sub = [{k: states[i][k] for k in keys} for i in senders]
        merged = plugin.aggregate(sub, [weights[i] for i in senders], previous)
        out.update({k: merged[k] for k in keys})
    return out


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---- model surgery -----------------------------------------------------------------------------
def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) sits in ``model``:
    how the custom adapter layers wrap a target linear layer."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.split(".")[-1], new)


def target_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` whose last name component is a target, in name order (ConfigError
    naming ``adapter.target_modules`` if none matches)."""
    found = sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets)
    if not found:
        raise ConfigError("adapter.target_modules", ",".join(targets), "no linear layer of the model has that name")
    return found


def replace_targets(model: nn.Module, targets: Sequence[str], factory: Callable[[int, nn.Linear], nn.Module]) -> int:
    """Replace every target ``nn.Linear`` (:func:`target_linears`) by ``factory(index, linear)``
    (index in name order); returns how many were replaced."""
    found = target_linears(model, targets)
    for index, (name, linear) in enumerate(found):
        replace_submodule(model, name, factory(index, linear))
    return len(found)


def freeze_all_but_head(model: nn.Module) -> None:
    """Freeze the base model; the task type's head (:func:`fedpeft.tasks.registry.head_prefixes`) trains."""
    prefixes = head_prefixes()  # the run's task types' heads (fedpeft.tasks.registry)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in prefixes)


# ---- determinism -------------------------------------------------------------------------------
def seeded_normal(shape: tuple[int, ...], seed: int, index: int, std: float) -> torch.Tensor:
    """N(0, std^2) from a private CPU generator: bit-identical on every machine."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run a decomposition of W0 with one torch thread, so every process gets the same bits.

    Multi-threaded LAPACK/BLAS splits the work by thread count and sums in another order:
    an SVD of a 384 x 384 MiniLM weight differs in the last bits between the server (2
    threads) and a Ray actor (1 thread), and the frozen-tensor hash check then (rightly)
    rejects every client. Frozen parts derived from W0 (SoKA, OSFT) are computed here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- export ------------------------------------------------------------------------------------
def export_npz(state: Mapping[str, torch.Tensor | np.ndarray], directory: Path) -> None:
    """Write a global adapter state as ``adapter_state.npz`` (re-load with ``load_state``)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}
    np.savez(directory / "adapter_state.npz", **arrays)  # type: ignore[arg-type]
