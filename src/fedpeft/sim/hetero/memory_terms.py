"""What every architecture family's memory estimate shares: the training shape it is asked
about, the estimate's components, and the interface a family implements.

The families themselves live beside this module (:mod:`fedpeft.sim.hetero.memory_encoder`,
:mod:`fedpeft.sim.hetero.memory_decoder`); :mod:`fedpeft.sim.hetero.memory` picks one from a
model's ``config.json`` and decides what a client does with the number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

from fedpeft.config import ConfigError

__all__ = ["DTYPE_BYTES", "F32", "MemoryEstimate", "ModelShape", "TrainShape", "dtype_bytes"]

F32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
"""Bytes per value of the base weights' dtypes fedpeft trains with (``model.dtype`` resolved)."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per value of ``dtype`` (a name: ``float32``, ``bfloat16``; ``torch.`` prefix allowed)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigError("model.dtype", dtype, f"the memory model knows {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class TrainShape:
    """What one client trains with: physical batch, sequence length, rank, the adapter's
    target modules (``adapter.target_modules``), DP, optimizer."""

    physical_batch: int
    seq_len: int
    rank: int
    targets: tuple[str, ...] = ("query", "value")
    dp: bool = True
    optimizer: str = "adam"
    # Fraction of a row's positions whose vocabulary logits the loss computes. 1.0 (all) is an
    # upper bound; the causal-LM loss asks the model for the logits from the earliest
    # completion position on (``logits_to_keep``), e.g. about half for a half-prompt batch.
    loss_positions: float = 1.0

    @property
    def targets_per_layer(self) -> int:
        return len(self.targets)

    @property
    def optimizer_states(self) -> int:
        """Values the optimizer keeps per trainable value (Adam two moments, SGD momentum one)."""
        return 2 if self.optimizer == "adam" else 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by component (see :mod:`fedpeft.sim.hetero.memory`).

    ``logits``: what the task's loss holds of vocabulary-sized logits at its peak (a causal
    LM's; 0 for a classifier, whose logits are a few values per example)."""

    weights: int
    adapter: int
    optimizer: int
    dp_per_sample: int
    activations: int
    workspace: int
    logits: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.optimizer + self.dp_per_sample + self.activations + self.workspace
                + self.logits)

    @property
    def batch_dependent(self) -> int:
        """The part that grows with the physical batch (what the RSS checks compare)."""
        return self.dp_per_sample + self.activations + self.workspace + self.logits

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


class ModelShape(Protocol):
    """One architecture family's dimensions and estimate (what :func:`~fedpeft.sim.hetero.memory.decide`
    needs). ``model_types`` are the ``config.json`` ``model_type`` values the family covers."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    @property
    def task_type(self) -> str:
        """The task type whose head and loss the estimate counts."""

    @classmethod
    def from_config(cls, config: Any, num_outputs: int, task_type: str, dtype: str) -> ModelShape:
        """From a Hugging Face config (attribute access; ``config.json`` as a namespace)."""

    @property
    def base_params(self) -> int:
        """Parameters of the base model with the task type's head (frozen and trained)."""

    def estimate(self, train: TrainShape) -> MemoryEstimate:
        """Peak bytes of one forward + backward (+ optimizer step) of one physical batch."""
