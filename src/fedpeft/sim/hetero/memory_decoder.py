"""Memory estimate of a Llama-style decoder (Llama, SmolLM2, Mistral) under LoRA.

The layout: token embedding (V x h), per layer an RMSNorm, attention with ``heads`` query
heads and ``kv_heads`` key/value heads of ``head_dim`` (grouped-query attention: K and V
are ``kv_heads * head_dim`` wide), an RMSNorm and a gated SiLU MLP (gate, up: h -> i,
down: i -> h); a final RMSNorm and the language-model head (V x h; tied = the embedding).

Components (bytes; ``d`` = bytes per value of the base weights' dtype, 4 for float32, 2 for
bfloat16; LoRA and the optimizer are float32 whatever ``d``, as PEFT keeps adapters):

* **weights** -- ``d`` x every base parameter (the task type's head included), plus the
  frozen LoRA A (float32);
* **adapter**, **optimizer**, **dp_per_sample** -- as for the encoder: B (``out x r`` of each
  target module, GQA's narrower K/V included) and the head, values and gradients; Adam's
  two moments; Opacus's per-example gradients of the physical batch plus the clipped sum;
* **activations** -- what autograd keeps for backward with a frozen backbone, eager
  attention (``attn_implementation="eager"``, as fedpeft loads decoders). Per layer and
  token: both RMSNorm inputs as float32 (RMSNorm computes in float32, so a bfloat16 model
  keeps the float32 copy), the rotated query and the key and value repeated to every query
  head (``repeat_kv``'s copies: saved by the two attention matmuls), the MLP's gate output,
  its SiLU and the up output -- ``8h + d*(3*heads*head_dim + 3i)`` bytes -- plus LoRA's
  rank-r intermediate (float32, ``4r`` per target); per example and layer the softmax
  output, ``heads * s**2`` values (float32; bfloat16 also keeps its bfloat16 cast:
  ``4 + d`` bytes each); plus the final RMSNorm input;
* **logits** -- the task type's vocabulary logits (:attr:`fedpeft.tasks.base.HeadMemory.vocab_logit_bytes`
  per position and vocabulary entry: a causal LM's loss holds three float32 copies,
  ``12 * b * s * V`` bytes -- for a small LM the largest term after the weights);
* **workspace** -- the peak is at the start of backward, when every activation is still
  kept and the loss's logits are at their largest; a later peak only counts where it
  exceeds that: the last layer's backward, first its MLP's three i-wide input gradients
  (the final norm's input already freed), then its softmax's backward: the kept output, its
  incoming and its outgoing gradient are three float32 values per score,
  ``12 * heads * s**2`` bytes per example (its MLP's activations and norm input freed by
  then) -- which wins for long sequences over a small vocabulary -- plus, under DP,
  Opacus's rescaled output gradient of one hooked module (an upper bound).

The first layer keeps less when the query is adapted: nothing before its first adapter
needs a gradient, so its input RMSNorm keeps nothing, and its rotated query is kept only
when ``k_proj`` is adapted too. The per-example gradients are summed in although they only
appear after the logits' peak (an upper bound, small for LoRA). Checked against measured
peak RSS on CPU in tests/test_hetero_decoder.py (see docs/causal-lm.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedpeft.config import ConfigError
from fedpeft.sim.hetero.memory_terms import F32, MemoryEstimate, TrainShape, dtype_bytes
from fedpeft.tasks.base import HeadMemory
from fedpeft.tasks.registry import get as get_task_type

__all__ = ["DecoderShape"]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions of a Llama-style decoder that the estimate needs (module doc), the
    base weights' dtype and the task type (``num_outputs``: a classifier's classes)."""

    family: ClassVar[str] = "decoder"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral")

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_outputs: int = 0
    task_type: str = "causal-lm"
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any, num_outputs: int = 0, task_type: str = "causal-lm",
                    dtype: str = "float32") -> DecoderShape:
        """From a Hugging Face ``LlamaConfig``/``MistralConfig`` (or its ``config.json``);
        ``dtype``: the base weights' (``model.dtype`` as resolved; the checkpoint's own dtype
        does not matter, fedpeft casts on load)."""
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        dtype_bytes(dtype)  # a known dtype, or a one-line error
        return cls(
            layers=int(config.num_hidden_layers), hidden=hidden, heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            intermediate=int(config.intermediate_size), vocab=int(config.vocab_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            num_outputs=num_outputs, task_type=task_type, dtype=str(dtype).removeprefix("torch."),
        )

    @property
    def head(self) -> HeadMemory:
        """The task type's head on this decoder (causal LM: none trained, vocabulary logits)."""
        return get_task_type(self.task_type).head_memory(self.hidden, self.num_outputs)

    def target_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of adapter target ``name`` (its last dotted component)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        dims = dict(zip(TARGET_MODULES, ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)), strict=True))
        key = name.rsplit(".", 1)[-1]
        if key not in dims:
            raise ConfigError("adapter.target_modules", name,
                              f"the decoder memory model knows {', '.join(TARGET_MODULES)}")
        return dims[key]

    @property
    def base_params(self) -> int:
        """Parameters of the decoder (Llama layout) + the task type's head, frozen and trained;
        the language-model head only where the task uses it and it is not tied."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = 2 * h * q + 2 * h * kv + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        layer = attention + mlp + 2 * h  # + the two RMSNorm weights
        head = self.head
        lm_head = self.vocab * h if head.vocab_logit_bytes and not self.tied_embeddings else 0
        return self.vocab * h + self.layers * layer + h + lm_head + head.frozen + head.trained

    def estimate(self, train: TrainShape) -> MemoryEstimate:
        """Peak memory of one forward + backward (+ optimizer step) of one physical batch."""
        d, h, i, r = dtype_bytes(self.dtype), self.hidden, self.intermediate, train.rank
        q = self.heads * self.head_dim
        b, s = train.physical_batch, train.seq_len
        tokens = b * s
        dims = [self.target_dims(n) for n in train.targets]
        head = self.head
        lora_a = self.layers * sum(r * fan_in for fan_in, _ in dims)
        trainable = self.layers * sum(out * r for _, out in dims) + head.trained
        weights = d * (self.base_params + head.trained) + F32 * lora_a  # PEFT keeps a copy of a head
        adapter = F32 * 2 * trainable  # values + gradients
        optimizer = F32 * train.optimizer_states * trainable
        dp = F32 * (b + 1) * trainable if train.dp else 0
        per_token = 2 * F32 * h + d * (3 * q + 3 * i) + F32 * r * len(dims)
        score_bytes = F32 + (d if d != F32 else 0)  # the softmax output kept (+ its bfloat16 cast)
        per_example = self.heads * s * s * score_bytes
        activations = (self.layers * (tokens * per_token + b * per_example) + F32 * tokens * h  # + final norm input
                       - tokens * self._first_layer_saving(train.targets, d))
        logits = head.vocab_logit_bytes * round(tokens * train.loss_positions) * self.vocab
        # the last layer's backward, measured from "every activation kept" (module doc): its MLP's
        # three i-wide input gradients once the final norm's input is freed; then its softmax's
        # output, incoming and outgoing gradient (three float32 values per score, the kept ones
        # already counted) once its MLP and post-attention norm input are freed too
        final = F32 * tokens * h
        mlp_backward = 3 * d * i * tokens - final
        score_backward = (b * self.heads * s * s * (3 * F32 - score_bytes) - final
                          - tokens * (F32 * h + 3 * d * i))
        backprops = F32 * tokens * max(out for _, out in dims) if train.dp and dims else 0  # one hook at a time
        workspace = max(0, max(mlp_backward, score_backward) + backprops - logits)
        return MemoryEstimate(weights, adapter, optimizer, dp, activations, workspace, logits)

    def _first_layer_saving(self, targets: tuple[str, ...], d: int) -> int:
        """Bytes per token the first layer keeps less than the others when the query is
        adapted (the usual case): its input RMSNorm has nothing before it that trains, and
        its rotated query is only kept for the key's gradient (when ``k_proj`` is adapted).
        Other target sets: no saving counted (an upper bound)."""
        names = {t.rsplit(".", 1)[-1] for t in targets}
        if "q_proj" not in names:
            return 0
        return F32 * self.hidden + (0 if "k_proj" in names else d * self.heads * self.head_dim)
