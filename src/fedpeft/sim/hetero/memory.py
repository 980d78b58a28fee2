"""Peak-memory estimate of one client's local training step, and what a client does when
its configuration does not fit its device.

The estimate (bytes, float32 throughout, as fedpeft trains) is the sum of

* **weights** -- every parameter of the base model, plus the frozen LoRA A;
* **adapter** -- the trainable tensors (LoRA B of rank r on each target module, the task
  type's head: :meth:`fedpeft.tasks.base.TaskType.head_memory`) and their gradients;
* **optimizer** -- Adam keeps two moments per trainable value (SGD with momentum one);
* **dp_per_sample** -- Opacus hooks mode materialises one gradient per example of the
  physical batch for every trainable tensor (``grad_sample``) plus the clipped sum;
* **activations** -- what autograd keeps for the backward pass of an encoder layer. The
  backbone is frozen, so a frozen ``Linear`` keeps no input (its weight gradient is never
  needed); per layer and token that leaves Q, K and V (saved by the attention matmuls),
  the two LayerNorm inputs and the GELU input, all float32, plus two one-byte dropout masks:
  ``4*(5h + i) + 2h`` bytes for hidden size h and intermediate size i; per head and pair
  of tokens the softmax output, the dropped-out probabilities (float32) and their mask:
  ``9 * a * s**2`` bytes. LoRA's rank-r intermediates (``4*r`` bytes per token and target)
  are kept for B's gradient and by Opacus's hooks;
* **workspace** -- the transient peak of the backward pass, about one layer's activations
  (gradients w.r.t. activations live one layer at a time) and Opacus's per-target
  backprops.

Sequence length is ``model.max_length``: an upper bound, since the trainer trims every
chunk to its longest example. The estimate ignores the framework's fixed overhead (CUDA
context, allocator caching) -- that is what a profile's ``usable_fraction`` leaves out.

Policy (:func:`decide`): keep the requested physical batch if it fits; otherwise halve it
(the logical batch, and so the DP accounting, is unchanged: the trainer accumulates the
physical chunks as Opacus virtual steps, exactly as ``BatchMemoryManager`` does); if even
one example per chunk does not fit, try the lower rank tiers; if nothing fits, decline
with the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedpeft.sim.hetero.profiles import GB, DeviceProfile
from fedpeft.tasks.base import HeadMemory
from fedpeft.tasks.registry import DEFAULT as DEFAULT_TASK_TYPE
from fedpeft.tasks.registry import get as get_task_type

__all__ = ["MemoryDecision", "MemoryEstimate", "ModelShape", "TrainShape", "decide", "estimate"]

F32 = 4


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a BERT-like encoder that the estimate needs, and its task type's
    head (``num_outputs``: e.g. the number of classes)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int = 512
    type_vocab: int = 2
    num_outputs: int = 2
    task_type: str = DEFAULT_TASK_TYPE

    @classmethod
    def from_config(cls, config: Any, num_outputs: int = 2, task_type: str = DEFAULT_TASK_TYPE) -> ModelShape:
        """From a Hugging Face ``PretrainedConfig`` (BERT, RoBERTa, MiniLM, ...)."""
        return cls(
            layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
            heads=int(config.num_attention_heads), intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size), max_positions=int(getattr(config, "max_position_embeddings", 512)),
            type_vocab=int(getattr(config, "type_vocab_size", 2) or 1), num_outputs=num_outputs,
            task_type=task_type,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path, num_outputs: int = 2, task_type: str = DEFAULT_TASK_TYPE) -> ModelShape:
        """Read ``config.json`` of a local model directory (no weights are loaded)."""
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        return cls.from_config(SimpleNamespace(**raw), num_outputs, task_type)

    @property
    def head(self) -> HeadMemory:
        """The task type's head on this encoder (sequence classification: a linear classifier
        trained in full, BERT's frozen pooler)."""
        return get_task_type(self.task_type).head_memory(self.hidden, self.num_outputs)

    @property
    def base_params(self) -> int:
        """Parameters of the encoder (BERT layout) + the task type's head, frozen and trained."""
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        head = self.head
        return embeddings + self.layers * layer + head.frozen + head.trained

    def head_params(self) -> int:
        """Parameters trained in full beside the adapter."""
        return self.head.trained


@dataclass(frozen=True)
class TrainShape:
    """What one client trains with: physical batch, sequence length, rank, DP, optimizer."""

    physical_batch: int
    seq_len: int
    rank: int
    targets_per_layer: int = 2  # query, value (each h x h)
    dp: bool = True
    optimizer: str = "adam"


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by component (see the module docstring)."""

    weights: int
    adapter: int
    optimizer: int
    dp_per_sample: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.dp_per_sample + self.activations + self.workspace

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def estimate(model: ModelShape, train: TrainShape) -> MemoryEstimate:
    """Peak memory of one forward + backward (+ optimizer step) of one physical batch."""
    h, a, i, r = model.hidden, model.heads, model.intermediate, train.rank
    b, s, t = train.physical_batch, train.seq_len, train.targets_per_layer * model.layers
    lora_a = t * r * h
    trainable = t * h * r + model.head_params()  # every B (h x r) + the task type's head
    weights = F32 * (model.base_params + model.head_params() + lora_a)  # PEFT keeps a copy of the head
    adapter = F32 * 2 * trainable  # values + gradients
    optimizer = F32 * (2 if train.optimizer == "adam" else 1) * trainable
    dp = F32 * (b + 1) * trainable if train.dp else 0
    tokens = b * s
    per_layer = tokens * (F32 * (5 * h + i) + 2 * h) + 9 * b * a * s * s
    lora_inter = F32 * tokens * r * train.targets_per_layer * (2 if train.dp else 1)
    activations = model.layers * (per_layer + lora_inter) + F32 * tokens * h  # + the last hidden states
    backprops = F32 * tokens * h * train.targets_per_layer if train.dp else 0
    workspace = per_layer + backprops
    return MemoryEstimate(weights, adapter, optimizer, dp, activations, workspace)


@dataclass(frozen=True)
class MemoryDecision:
    """What a client of ``profile`` does: train with ``physical_batch`` at ``rank``, or decline."""

    profile: str
    physical_batch: int
    rank: int
    estimate_bytes: int
    usable_bytes: float
    declined: bool = False
    reason: str = ""

    @property
    def adapted(self) -> bool:
        return bool(self.reason) and not self.declined


def decide(
    profile: DeviceProfile, model: ModelShape, train: TrainShape, rank_tiers: tuple[int, ...] = ()
) -> MemoryDecision:
    """Largest physical batch (halving) at the highest rank tier that fits ``profile``.

    ``train.rank`` is tried first, then every lower value of ``rank_tiers``; a client that
    does not fit even one example per chunk at the lowest tier declines.
    """
    usable = profile.usable_bytes
    ranks = [train.rank] + sorted((x for x in set(rank_tiers) if x < train.rank), reverse=True)
    first = estimate(model, train)
    for rank in ranks:
        batch = train.physical_batch
        while batch >= 1:
            est = estimate(model, TrainShape(batch, train.seq_len, rank, train.targets_per_layer, train.dp,
                                             train.optimizer))
            if est.total <= usable:
                reason = ""
                if batch != train.physical_batch or rank != train.rank:
                    reason = (f"{profile.name}: {first.total / GB:.2f} GB needed at physical batch "
                              f"{train.physical_batch}, rank {train.rank} > {usable / GB:.2f} GB usable; "
                              f"using physical batch {batch} (virtual steps), rank {rank}")
                return MemoryDecision(profile.name, batch, rank, est.total, usable, False, reason)
            batch //= 2
    lowest = estimate(model, TrainShape(1, train.seq_len, ranks[-1], train.targets_per_layer, train.dp,
                                        train.optimizer))
    reason = (f"{profile.name} declines: needs {lowest.total / GB:.2f} GB even at physical batch 1, "
              f"rank {ranks[-1]} (weights alone {lowest.weights / GB:.2f} GB); usable memory is "
              f"{usable / GB:.2f} GB ({profile.memory_gb:g} GB x {profile.usable_fraction:g})")
    return MemoryDecision(profile.name, 0, ranks[-1], lowest.total, usable, True, reason)
