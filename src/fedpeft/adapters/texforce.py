"""TexForce, federated: reinforcement learning of the text encoder's LoRA (policy-gradient analog).

Paper: Chaofeng Chen, Annan Wang, Haoning Wu, Liang Liao, Wenxiu Sun, Qiong Yan, Weisi Lin,
"Enhancing Diffusion Models with Text-Encoder Reinforcement Learning", ECCV 2024
(arXiv:2311.15657). TexForce fine-tunes the *text encoder* of a diffusion model with LoRA by
reinforcement learning (PPO/DDPO) on reward signals instead of supervised targets.

Our tasks are text classification and instruction tuning, so we use the policy-gradient
ANALOG, not the paper's setting. Classification: the policy is the classifier's softmax over
labels, pi(a | x); the action is a label sampled from the policy at the start of the round,
a ~ pi_old(. | x); the reward is correctness, r = 1[a == y]; the advantage is r - pi_old(y | x) (the expected reward of the old
policy -- a per-example baseline, so each example's loss depends on that example only, as DP-SGD
requires; a batch-mean baseline would couple examples); the objective is PPO's clipped surrogate
``-min(rho * A, clip(rho, 1 - c, 1 + c) * A)`` with ``rho = pi(a|x) / pi_old(a|x)``, averaged over
the batch. pi_old is the global model received at the start of the round (its trainable
tensors are snapshotted in ``load_state``; its log-probabilities come from a no-grad forward pass
with those tensors, in eval mode). The adapter on the encoder is FFA-LoRA's: A frozen from the
shared seed, B and the classification head train.

Causal-LM instruction tuning (``task_type = "causal-lm"``) gets the same analog one token at a
time: the policy is the decoder's next-token distribution at each completion position (teacher
forced on the reference prefix, position t predicting token t+1), the action a token sampled from
pi_old there, the reward 1[a == reference token], the advantage r - pi_old(reference | prefix);
an example's surrogate is the mean over *its own* completion tokens (the task type's per-example
weighting, so DP-SGD still clips one example's gradient) and the loss their mean over the batch.
What travels: every ``lora_B`` + the head, if the task type has one (A regenerated from the
seed, hash-checked).
Averaging: exact (dW = s * B @ A is linear in B, A shared), as in FFA-LoRA.
DP: yes. The loss is per example (mean over the batch), so Opacus clips each example's
gradient; the old-policy pass runs without gradients and adds no hooks' activations.

Option: ``clip_ratio`` (PPO's c, default 0.2). The value :meth:`TexForcePlugin.loss` returns
is the cross-entropy of the current policy on the batch (so the logged "train loss" is
comparable with the other methods; for a causal LM the completion loss of
:mod:`fedpeft.tasks.causal_lm`); its gradient is the PPO surrogate's alone.

Deviations from the paper:
* Text classification instead of text-to-image diffusion: no image generation, no diffusion
  denoising chain; one action (a label) per example; the reward is correctness, not a learnt
  image/aesthetic reward model (a reward model could replace ``reward``; none is shipped).
* One PPO "epoch" per round: each local step samples fresh actions from pi_old for its batch
  (no stored rollouts), no value network (the baseline is pi_old's exact expected reward), no
  KL/entropy bonus.
* LoRA A is frozen (FFA-LoRA) for exact federated averaging; the paper trains full LoRA.
* Causal LM: one action per completion token under teacher forcing (a per-token bandit with the
  reference token as the only rewarded action), not rollouts of whole generated answers scored
  by a reward model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import hash_tensors
from fedpeft.adapters.lora import inject_lora, lora_a_tensors
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig
from fedpeft.data.batching import Batch
from fedpeft.tasks.base import TaskType
from fedpeft.tasks.causal_lm import completion_losses
from fedpeft.tasks.chat import IGNORE

__all__ = ["TexForceOptions", "TexForcePlugin", "policy_cross_entropy", "ppo_clipped_loss"]

_OLD = "_texforce_old_policy"


@dataclass(frozen=True, kw_only=True)
class TexForceOptions:
    """PPO's clip ratio c."""

    clip_ratio: float = option(0.2, low=1e-6, high=10.0)


def _surrogates(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate of each row (logits M x C, targets M), a label sampled as the action."""
    old_logp = F.log_softmax(old_logits.detach(), dim=-1)
    actions = torch.multinomial(old_logp.exp(), 1).squeeze(1)
    reward = (actions == labels).to(logits.dtype)
    advantage = reward - old_logp.exp().gather(1, labels[:, None]).squeeze(1)
    logp = F.log_softmax(logits, dim=-1).gather(1, actions[:, None]).squeeze(1)
    ratio = torch.exp(logp - old_logp.gather(1, actions[:, None]).squeeze(1))
    return torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - clip, 1 + clip) * advantage)


def ppo_clipped_loss(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor, clip: float) -> torch.Tensor:
    """Mean over examples of PPO's clipped surrogate. Class targets (logits N x C, labels N):
    one sampled label per example. Token targets (logits N x T x V, labels N x T with
    :data:`~fedpeft.tasks.chat.IGNORE` off the completion): one sampled token per completion
    position, position t predicting token t+1, averaged over each example's own tokens."""
    if labels.dim() == 1:
        return -_surrogates(logits, old_logits, labels, clip).mean()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    per_token = torch.zeros(targets.shape, dtype=logits.dtype, device=logits.device)
    per_token[keep] = _surrogates(logits[:, :-1][keep], old_logits[:, :-1][keep], targets[keep], clip)
    return -(per_token.sum(dim=1) / keep.sum(dim=1).clamp(min=1)).mean()


def policy_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's cross-entropy of the current policy: over classes, or the completion loss
    (each example's mean over its completion tokens, then the batch mean) for token targets."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    sums, counts = completion_losses(logits, labels)
    return (sums / counts.clamp(min=1)).mean()


class TexForcePlugin(AdapterPlugin):
    """PPO-clipped policy gradient on FFA-LoRA; B + head travel, averaging exact."""

    name = "texforce"
    paper = "TexForce (Chen et al., ECCV 2024), policy-gradient analog for classification and causal LMs"
    travels = "lora_B + head (A regenerated from seed, hash-checked)"
    exact_average = True
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step
    options_type = TexForceOptions

    def settings(self, cfg: RunConfig) -> TexForceOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, TexForceOptions, cfg)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        peft_model = inject_lora(model, cfg, freeze_a=True)
        peft_model._texforce_clip = self.settings(cfg).clip_ratio  # type: ignore[assignment]
        self._snapshot(peft_model)
        return peft_model

    def _snapshot(self, model: nn.Module) -> None:
        """Remember the current trainable tensors as pi_old (the round's starting policy)."""
        object.__setattr__(model, _OLD, {k: v.detach().clone() for k, v in self.trainable_state(model).items()})

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        super().load_state(model, state)
        self._snapshot(model)

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors(lora_a_tensors(model))

    def loss(self, model: nn.Module, batch: Batch, task_type: TaskType) -> torch.Tensor:
        inner = getattr(model, "_module", model)  # under Opacus: the wrapped PEFT model
        inputs, labels = task_type.model_inputs(batch), batch[task_type.target_key]  # actions: classes or tokens
        logits = model(**inputs).logits
        was_training = inner.training
        with torch.no_grad():
            inner.eval()
            old_logits = functional_call(inner, getattr(inner, _OLD), args=(), kwargs=inputs, strict=False).logits
            inner.train(was_training)
        surrogate = ppo_clipped_loss(logits, old_logits, labels, float(getattr(inner, "_texforce_clip", 0.2)))
        # Value = cross-entropy of the current policy (what the trainer logs as "train loss");
        # gradient = the PPO surrogate's only (the detached terms have none).
        return surrogate - surrogate.detach() + policy_cross_entropy(logits.detach(), labels)
