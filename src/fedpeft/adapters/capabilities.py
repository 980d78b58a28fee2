"""Optional plugin capabilities, declared as Protocols and checked by type.

:class:`~fedpeft.adapters.base.AdapterPlugin` is what every method must have. A method that
needs more from the server or the ClientApp implements one of the Protocols below and
names it among its plugin's base classes (so mypy checks the signatures); a caller asks
``isinstance(plugin, Capability)`` -- never a ``getattr`` of a method name -- and a plugin
missing any method of a Protocol does not have that capability. Third-party plugins may
implement one structurally without inheriting it; ``fedpeft methods`` lists each
method's capabilities (:func:`capabilities_of`).

What a capability may see of the server is spelled out too: a :class:`ServerRoundContext`
(configuration, model, tokenizer, tasks, global state, public batches) and a
:class:`RoundOutcome` (the accepted replies' states), nothing else; per-run server-side
state lives in the object that :meth:`ServerRoundWork.server_round_hook` returns, which the
server keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedpeft.adapters.common import NDArrays
from fedpeft.config import RunConfig
from fedpeft.data.sources import TextDataset

__all__ = [
    "CAPABILITIES", "DataRelease", "FrozenDelta", "MetricsRow", "MultiTaskAggregation", "PersonalEval", "PersonalEvalParams",
    "PublicStep", "RankTiers", "ReleaseParams",
    "ReplyState", "ReplyVariants", "RoundOutcome", "ServerRoundContext", "ServerRoundHook", "ServerRoundWork",
    "ServerState", "TaskView", "capabilities_of",
]

MetricsRow = dict[str, object]  # JSON values added to a round's metrics.jsonl row


# ---- client side -----------------------------------------------------------------------------
@runtime_checkable
class ReplyVariants(Protocol):
    """Clients send different tensors in different rounds (MeteoRA: experts, then gates)."""

    def reply_variants(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Every reply shape of the active task, by suffix (``""`` first): the server builds
        one reply spec per ``<task><suffix>``."""
        ...


@runtime_checkable
class RankTiers(Protocol):
    """Clients may train a smaller rank than the run's (heterogeneous-rank scenarios)."""

    def set_client_rank(self, model: nn.Module, rank: int) -> None:
        """Use the first ``rank`` rank components only (after ``load_state``, before training)."""
        ...


class ReleaseParams(NamedTuple):
    """A one-off DP release: its ledger tag, per-example clip norm and noise multiplier."""

    tag: str
    clip: float
    sigma: float


class PersonalEvalParams(NamedTuple):
    """A personalised client-side evaluation: the share of each client's data held out for it
    (0: none) and the noise multiplier of its DP release (:mod:`fedpeft.client.personal_eval`)."""

    fraction: float
    sigma: float


@runtime_checkable
class PersonalEval(Protocol):
    """Clients keep part of the model (FedSA-LoRA's B), so the server's model is not the
    method's: in the last round each client evaluates its personalised model on a held-out
    split of its own data and releases the metric, noised and accounted in its ledger."""

    def personal_eval_params(self, cfg: RunConfig) -> PersonalEvalParams: ...


@runtime_checkable
class DataRelease(Protocol):
    """Every client releases once a clipped, noised mean of per-example vectors (ICM-LoRA's
    task vector), accounted in its ledger (:mod:`fedpeft.client.task_release`)."""

    def release_params(self, cfg: RunConfig) -> ReleaseParams: ...

    def release_vectors(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: TextDataset,
                        cfg: RunConfig) -> torch.Tensor:
        """(n, d) per-example vectors of the client's data, before clipping and noise."""
        ...

    def install_release(self, model: nn.Module, task: str, vector: torch.Tensor) -> None:
        """Put the released vector into the client's model (it travels with the reply)."""
        ...


# ---- server side -----------------------------------------------------------------------------
@runtime_checkable
class ServerState(Protocol):
    """Tensors the server sets and sends down but clients never send (SMoRA's routing bias)."""

    def server_state(self, model: nn.Module) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class FrozenDelta(Protocol):
    """A server-computed delta of the frozen base weights (FedEx-LoRA's residual, FLoRA's folded
    stack): part of the global state the server sends, never of a reply (the reply spec leaves it
    out); ``aggregate`` returns it beside the trainable tensors and ``load_state`` adds it to the
    frozen weights (server and clients)."""

    def frozen_delta(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The delta now installed, by global-state name (zeros on a fresh model)."""
        ...


@runtime_checkable
class PublicStep(Protocol):
    """A server-side step on the server-held unlabelled sample after each released round."""

    def public_step(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                    cfg: RunConfig) -> dict[str, list[float]]:
        """Update the server's model in place (tensors it changes are in ``server_state``);
        returns diagnostics per layer."""
        ...


@runtime_checkable
class MultiTaskAggregation(Protocol):
    """Replaces the per-group rule of multi-task runs (:func:`fedpeft.adapters.common.grouped_aggregate`)."""

    def aggregate_multitask(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray],
        current: Mapping[str, np.ndarray],
    ) -> NDArrays:
        """``current``: the global state sent out this round; the result is the next one."""
        ...


class TaskView(Protocol):
    """One task of the run as the server holds it (:class:`fedpeft.data.layout.TaskData` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def public(self) -> TextDataset:
        """The server-held sample of the task (never given to a client)."""
        ...


class ServerRoundContext(Protocol):
    """What of the server a plugin's round-end work may read (the multi-task server is one)."""

    @property
    def cfg(self) -> RunConfig: ...

    @property
    def model(self) -> nn.Module: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def tasks(self) -> Sequence[TaskView]: ...

    @property
    def state(self) -> Mapping[str, np.ndarray]:
        """The global state after this round (what the next round sends)."""
        ...

    def public_batches(self) -> Iterator[tuple[str, Mapping[str, torch.Tensor]]]:
        """(task, batch) over the server-held unlabelled sample of every task."""
        ...


class ReplyState(Protocol):
    """One accepted, validated reply, as far as a plugin may read it: its tensors."""

    @property
    def state(self) -> Mapping[str, np.ndarray]: ...


class RoundOutcome(Protocol):
    """A finished round (:class:`fedpeft.strategies.adapter_avg.RoundReport` is one)."""

    @property
    def accepted(self) -> Sequence[ReplyState]: ...

    @property
    def released(self) -> bool:
        """A new global state was aggregated from ``accepted``."""
        ...


class ServerRoundHook(Protocol):
    """A plugin's per-run server-side work, kept by the server for the whole run."""

    def round_end(self, server_round: int, outcome: RoundOutcome) -> MetricsRow:
        """Work after the round's evaluation; returns entries for the round's metrics row."""
        ...


@runtime_checkable
class ServerRoundWork(Protocol):
    """Method-specific server work and metrics after every round (MeteoRA, ICM-LoRA)."""

    def server_round_hook(self, ctx: ServerRoundContext) -> ServerRoundHook:
        """The object that does the work; created once per run, on the first round's end."""
        ...


CAPABILITIES: dict[str, type] = {
    "reply_variants": ReplyVariants, "rank_tiers": RankTiers, "data_release": DataRelease,
    "server_state": ServerState, "public_step": PublicStep, "multitask_aggregation": MultiTaskAggregation,
    "server_round_work": ServerRoundWork, "frozen_delta": FrozenDelta, "personal_eval": PersonalEval,
}


def capabilities_of(plugin: object) -> list[str]:
    """Names (keys of :data:`CAPABILITIES`) of the optional capabilities ``plugin`` has."""
    return [name for name, proto in CAPABILITIES.items() if isinstance(plugin, proto)]
