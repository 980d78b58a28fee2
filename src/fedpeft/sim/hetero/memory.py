"""Peak-memory estimate of one client's local training step, and what a client does when
its configuration does not fit its device.

One estimator per architecture family, chosen from the model's ``config.json``
(``model_type``, else its ``architectures``) by :func:`model_shape`:

* **encoder** (:class:`~fedpeft.sim.hetero.memory_encoder.EncoderShape`): BERT, RoBERTa,
  MiniLM, ... -- ``model_type`` bert, roberta, xlm-roberta, camembert; float32;
* **decoder** (:class:`~fedpeft.sim.hetero.memory_decoder.DecoderShape`): Llama-style
  decoders -- ``model_type`` llama (SmolLM2 is one), mistral; float32 or bfloat16 weights,
  grouped-query attention, tied or untied embeddings, the causal LM's vocabulary logits.

Any other ``model_type`` is a one-line ``ConfigError`` naming the known ones (no generic
guess: a wrong estimate would silently admit or refuse devices). Each estimate is the sum of
:class:`~fedpeft.sim.hetero.memory_terms.MemoryEstimate`'s components -- weights, adapter
values and gradients, optimizer state, Opacus's per-example gradients, the activations
autograd keeps, the vocabulary logits of a causal LM's loss, and the backward pass's
transient workspace -- each family's module says how it counts them. The task type's part
(its head, whether it scores the vocabulary) is :meth:`fedpeft.tasks.base.TaskType.head_memory`.

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
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.sim.hetero.memory_decoder import DecoderShape
from fedpeft.sim.hetero.memory_encoder import EncoderShape
from fedpeft.sim.hetero.memory_terms import MemoryEstimate, ModelShape, TrainShape
from fedpeft.sim.hetero.profiles import GB, DeviceProfile
from fedpeft.tasks.registry import DEFAULT as DEFAULT_TASK_TYPE

__all__ = ["FAMILIES", "DecoderShape", "EncoderShape", "MemoryDecision", "MemoryEstimate", "ModelShape",
           "TrainShape", "decide", "estimate", "model_shape", "model_shape_from_dir", "model_type_of"]

FAMILIES: dict[str, type[EncoderShape] | type[DecoderShape]] = {
    t: family for family in (EncoderShape, DecoderShape) for t in family.model_types}
"""``model_type`` -> the estimator of its architecture family."""


def model_type_of(config: Any) -> str:
    """A config's ``model_type``; else the one its first ``architectures`` entry names
    (``LlamaForCausalLM`` -> ``llama``); ``""`` when it has neither."""
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type:
        return model_type
    architectures = list(getattr(config, "architectures", None) or ())
    if not architectures:
        return ""
    stem = str(architectures[0]).split("For", 1)[0].lower()
    return next((t for t in FAMILIES if t.replace("-", "") == stem), stem)


def model_shape(config: Any, num_outputs: int = 2, task_type: str = DEFAULT_TASK_TYPE,
                dtype: str = "float32") -> ModelShape:
    """The memory model of ``config``'s architecture family (module doc); ``dtype``: the base
    weights' (``model.dtype`` as the run resolves it). Unknown families: ``ConfigError``."""
    kind = model_type_of(config)
    family = FAMILIES.get(kind)
    if family is None:
        raise ConfigError("model.path", kind or "(no model_type)",
                          f"the heterogeneous memory model knows model_type {', '.join(sorted(FAMILIES))}")
    return family.from_config(config, num_outputs, task_type, dtype)


def model_shape_from_dir(path: str | Path, num_outputs: int = 2, task_type: str = DEFAULT_TASK_TYPE,
                         dtype: str = "float32") -> ModelShape:
    """:func:`model_shape` of a local model directory's ``config.json`` (no weights are loaded)."""
    raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return model_shape(SimpleNamespace(**raw), num_outputs, task_type, dtype)


def estimate(model: ModelShape, train: TrainShape) -> MemoryEstimate:
    """Peak memory of one forward + backward (+ optimizer step) of one physical batch."""
    return model.estimate(train)


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
            est = estimate(model, replace(train, physical_batch=batch, rank=rank))
            if est.total <= usable:
                reason = ""
                if batch != train.physical_batch or rank != train.rank:
                    reason = (f"{profile.name}: {first.total / GB:.2f} GB needed at physical batch "
                              f"{train.physical_batch}, rank {train.rank} > {usable / GB:.2f} GB usable; "
                              f"using physical batch {batch} (virtual steps), rank {rank}")
                return MemoryDecision(profile.name, batch, rank, est.total, usable, False, reason)
            batch //= 2
    lowest = estimate(model, replace(train, physical_batch=1, rank=ranks[-1]))
    reason = (f"{profile.name} declines: needs {lowest.total / GB:.2f} GB even at physical batch 1, "
              f"rank {ranks[-1]} (weights alone {lowest.weights / GB:.2f} GB); usable memory is "
              f"{usable / GB:.2f} GB ({profile.memory_gb:g} GB x {profile.usable_fraction:g})")
    return MemoryDecision(profile.name, 0, ranks[-1], lowest.total, usable, True, reason)
