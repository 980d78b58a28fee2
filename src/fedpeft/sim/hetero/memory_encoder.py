"""Memory estimate of a BERT-like encoder (BERT, RoBERTa, MiniLM, ...) under LoRA, float32.

Components (bytes, float32 throughout, as fedpeft trains an encoder):

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

Every target module is counted as h x h (``query``, ``key``, ``value``, the attention
output); the trainable tensors are B's, as FFA-LoRA trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedpeft.sim.hetero.memory_terms import F32, MemoryEstimate, TrainShape, dtype_bytes
from fedpeft.tasks.base import HeadMemory
from fedpeft.tasks.registry import DEFAULT as DEFAULT_TASK_TYPE
from fedpeft.tasks.registry import get as get_task_type

__all__ = ["EncoderShape"]


@dataclass(frozen=True)
class EncoderShape:
    """The dimensions of a BERT-like encoder that the estimate needs, and its task type's
    head (``num_outputs``: e.g. the number of classes)."""

    family: ClassVar[str] = "encoder"
    model_types: ClassVar[tuple[str, ...]] = ("bert", "roberta", "xlm-roberta", "camembert")

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
    def from_config(cls, config: Any, num_outputs: int = 2, task_type: str = DEFAULT_TASK_TYPE,
                    dtype: str = "float32") -> EncoderShape:
        """From a Hugging Face ``PretrainedConfig`` (BERT, RoBERTa, MiniLM, ...); fedpeft
        trains encoders in float32 only."""
        if dtype_bytes(dtype) != F32:
            raise ValueError(f"the encoder memory model is float32 only (fedpeft trains encoders in float32), "
                             f"got {dtype}")
        shape = cls(
            layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
            heads=int(config.num_attention_heads), intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size), max_positions=int(getattr(config, "max_position_embeddings", 512)),
            type_vocab=int(getattr(config, "type_vocab_size", 2) or 1), num_outputs=num_outputs,
            task_type=task_type,
        )
        if shape.head.vocab_logit_bytes:
            raise ValueError(f"the encoder memory model has no language-model head (task type {task_type} "
                             "scores the vocabulary)")
        return shape

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

    def estimate(self, train: TrainShape) -> MemoryEstimate:
        """Peak memory of one forward + backward (+ optimizer step) of one physical batch."""
        h, a, i, r = self.hidden, self.heads, self.intermediate, train.rank
        b, s, t = train.physical_batch, train.seq_len, train.targets_per_layer * self.layers
        lora_a = t * r * h
        trainable = t * h * r + self.head_params()  # every B (h x r) + the task type's head
        weights = F32 * (self.base_params + self.head_params() + lora_a)  # PEFT keeps a copy of the head
        adapter = F32 * 2 * trainable  # values + gradients
        optimizer = F32 * train.optimizer_states * trainable
        dp = F32 * (b + 1) * trainable if train.dp else 0
        tokens = b * s
        per_layer = tokens * (F32 * (5 * h + i) + 2 * h) + 9 * b * a * s * s
        lora_inter = F32 * tokens * r * train.targets_per_layer * (2 if train.dp else 1)
        activations = self.layers * (per_layer + lora_inter) + F32 * tokens * h  # + the last hidden states
        backprops = F32 * tokens * h * train.targets_per_layer if train.dp else 0
        workspace = per_layer + backprops
        return MemoryEstimate(weights, adapter, optimizer, dp, activations, workspace)
