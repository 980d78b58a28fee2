"""The adapter plugin interface and its registry.

A plugin owns both halves of a parameter-efficient method:

* client half -- :meth:`AdapterPlugin.attach` injects the adapter into a fresh base model
  and freezes what must stay frozen; :meth:`trainable_state` names exactly the tensors
  that leave the client; :meth:`load_state` installs the global state received;
  :meth:`loss` is the local objective (the task type's loss unless the method says otherwise);
* server half -- :meth:`aggregate` combines validated client states into the next
  global state, and :meth:`server_step` is any extra server-side step the method needs.

Shared-seed methods also expose :meth:`frozen_fingerprint`: a hash of the seeded frozen
tensors (FFA-LoRA's A) that the server sends each round and every client checks.

Plugins register under a unique name (``register`` refuses duplicates) and are looked up
with :func:`get`; ``fedpeft methods`` prints :func:`describe`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedpeft.data.batching import Batch
from fedpeft.tasks.base import TaskType

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft.config import RunConfig

__all__ = ["AdapterPlugin", "NDArrays", "float_option", "hash_tensors", "replace_submodule", "weighted_mean"]

NDArrays = dict[str, np.ndarray]


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


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) sits in ``model``:
    how the custom adapter layers wrap a target linear layer."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.split(".")[-1], new)


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def float_option(cfg: RunConfig, name: str, default: float, low: float, high: float) -> float:
    """``adapter.options[name]`` as a float in [low, high] (CLI values arrive as strings);
    ConfigError naming the key otherwise."""
    from fedpeft.config import ConfigError

    raw = cfg.adapter.option(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"adapter.options.{name}", raw, "expected a number") from None
    if not (low <= value <= high):
        raise ConfigError(f"adapter.options.{name}", raw, f"must be in [{low:g}, {high:g}]")
    return value


class AdapterPlugin(ABC):
    """One adapter method, client and server halves. Subclasses set the class attributes."""

    name: str = ""
    paper: str = ""
    travels: str = ""
    exact_average: bool = False
    supports_dp: bool = True
    dp_refusal: str = ""  # why DP-SGD cannot be used, when supports_dp is False
    # Client-level central DP (fedpeft.privacy.central) noises the weighted mean of the clients' states,
    # so it is sound only if ``aggregate`` IS that mean and ``server_step`` the identity, and the
    # replies have the global state's shapes. True only on plugins checked to be so.
    central_dp_compatible: bool = False
    options: tuple[str, ...] | None = None  # allowed adapter.options keys (None: not checked)

    # ---- configuration ---------------------------------------------------------------
    def validate_config(self, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for settings this method cannot honour."""
        from fedpeft.config import ConfigError

        if cfg.privacy.enabled and not self.supports_dp:
            raise ConfigError("privacy.epsilon", cfg.privacy.epsilon, f"{self.name} cannot run with DP-SGD: {self.dp_refusal}; use inf")
        if self.options is not None:
            unknown = sorted(k for k, _ in cfg.adapter.options if k not in self.options)
            if unknown:
                allowed = ", ".join(self.options) or "none"
                raise ConfigError(f"adapter.options.{unknown[0]}", dict(cfg.adapter.options)[unknown[0]],
                                  f"unknown option for {self.name}; allowed: {allowed}")

    # ---- client half -------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """Inject the adapter into ``model`` and freeze everything that must not train."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Exactly the tensors that leave the client (default: all trainable parameters)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install a (global) state produced by :meth:`trainable_state` / :meth:`aggregate`."""
        params = dict(model.named_parameters())
        missing = set(self.trainable_state(model)) - set(state)
        if missing:
            raise KeyError(f"state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, value in state.items():
                if name not in params:
                    raise KeyError(f"unknown tensor {name!r} for method {self.name}")
                src = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
                params[name].copy_(src.to(params[name].device, params[name].dtype))

    def frozen_fingerprint(self, model: nn.Module) -> str:
        """Hash of seeded frozen tensors every client must share ("" if none)."""
        return ""

    def loss(self, model: nn.Module, batch: Batch, task_type: TaskType) -> torch.Tensor:
        """Local training objective of one (opaque) batch; mean over its examples (Opacus
        scales per sample). Default: the task type's loss (:meth:`TaskType.loss`)."""
        return task_type.loss(model, batch)

    def client_extras(self) -> dict[str, Any]:
        """Per-client state that persists across rounds and never leaves the client."""
        return {}

    def local_state(self, model: nn.Module) -> NDArrays:
        """Tensors that stay on this client and persist across its rounds (default: none).

        In simulation one worker process serves several virtual clients with ONE cached
        model, so the ClientApp saves this after training into the node's
        ``Context.state`` and restores it with :meth:`load_local_state` before the next
        round of the same client. It is never part of a reply.
        """
        return {}

    def load_local_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Install this client's local state; an empty ``state`` means a fresh client and
        must reset the local tensors to their initial values (default: nothing to do)."""
        return None

    # ---- server half -------------------------------------------------------------------
    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray]
    ) -> NDArrays:
        """Combine validated client states (default: weighted mean, exact for linear parts)."""
        return weighted_mean(states, weights)

    def server_step(self, server_round: int, state: NDArrays, cfg: RunConfig) -> NDArrays:
        """Optional server-side step after aggregation (default: none)."""
        return state

    # ---- export ------------------------------------------------------------------------
    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the adapter so it can be re-loaded; PEFT methods use ``save_pretrained``."""
        save = getattr(model, "save_pretrained", None)
        if save is None:
            raise NotImplementedError(f"{self.name} has no export format")
        save(str(directory))

    def describe(self) -> str:
        exact = "exact" if self.exact_average else "approximate"
        dp = "DP ok" if self.supports_dp else "no DP"
        return f"{self.name:<14} {self.paper} | travels: {self.travels} | averaging {exact} | {dp}"
