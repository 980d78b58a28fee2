"""The adapter plugin interface.

A plugin owns both halves of a parameter-efficient method:

* client half -- :meth:`AdapterPlugin.attach` injects the adapter into a fresh base model
  and freezes what must stay frozen; :meth:`trainable_state` names exactly the tensors
  that leave the client; :meth:`load_state` installs the global state received;
  :meth:`loss` is the local objective (the task type's loss unless the method says otherwise);
* server half -- :meth:`aggregate` combines validated client states into the next
  global state, and :meth:`server_step` is any extra server-side step the method needs.

Shared-seed methods also expose :meth:`frozen_fingerprint`: a hash of the seeded frozen
tensors (FFA-LoRA's A) that the server sends each round and every client checks.

Everything else is optional and declared: hooks as Protocols in
:mod:`fedpeft.adapters.capabilities` (checked with ``isinstance``), options as a frozen
dataclass named by :attr:`AdapterPlugin.options_type` (:mod:`fedpeft.adapters.options`,
checked by :meth:`validate_config`). :mod:`fedpeft.adapters.registry` registers the shipped
plugins under unique names; ``fedpeft methods`` prints :meth:`AdapterPlugin.describe`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.capabilities import capabilities_of
from fedpeft.adapters.common import NDArrays, hash_tensors, weighted_mean
from fedpeft.adapters.options import option_specs, parse_options
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.batching import Batch
from fedpeft.tasks.base import TaskType

__all__ = ["AdapterPlugin", "NDArrays", "hash_tensors", "weighted_mean"]


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
    # The method's options (a frozen dataclass of fedpeft.adapters.options fields); None: the
    # method reads no options and adapter.options is not checked.
    options_type: ClassVar[type | None] = None
    # The task types (fedpeft.tasks.registry names) the method applies to, and why not the
    # others (one line, for the refusal and ``fedpeft methods``); None: every task type.
    task_types: ClassVar[tuple[str, ...] | None] = None
    task_type_refusal: ClassVar[str] = ""

    # ---- configuration ---------------------------------------------------------------
    def validate_config(self, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for settings this method cannot honour: DP-SGD where it is
        refused, and any ``adapter.options`` entry its ``options_type`` does not accept."""
        if self.task_types is not None and cfg.task_type not in self.task_types:
            raise ConfigError("adapter.method", self.name, f"does not apply to task_type={cfg.task_type!r}: "
                                                           f"{self.task_type_refusal or 'not supported'}; it runs on "
                                                           f"{', '.join(self.task_types)}")
        if cfg.privacy.enabled and not self.supports_dp:
            raise ConfigError("privacy.epsilon", cfg.privacy.epsilon, f"{self.name} cannot run with DP-SGD: {self.dp_refusal}; use inf")
        if self.options_type is not None:
            parse_options(self.name, self.options_type, cfg)

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
        """One line for ``fedpeft methods``: paper, what travels, averaging, DP, the options
        the method takes and its optional capabilities (:mod:`fedpeft.adapters.capabilities`)."""
        exact = "exact" if self.exact_average else "approximate"
        dp = "DP ok" if self.supports_dp else "no DP"
        options = ", ".join(option_specs(self.options_type)) if self.options_type is not None else "-"
        hooks = ", ".join(capabilities_of(self)) or "-"
        tasks = "all task types" if self.task_types is None else \
            f"task types: {', '.join(self.task_types)} ({self.task_type_refusal})"
        return (f"{self.name:<14} {self.paper} | travels: {self.travels} | averaging {exact} | {dp} | {tasks} | "
                f"options: {options} | capabilities: {hooks}")
