"""RoLoRA: federated LoRA by alternating optimisation -- B rounds, then A rounds.

Paper: Shuangyi Chen, Yuanxin Guo, Yue Ju, Harik Dalal, Zhongwen Zhu, Ashish Khisti, "Robust
Federated Finetuning of LLMs via Alternating Optimization of LoRA", arXiv:2502.01755 (2025;
NeurIPS 2025).

Method: ``dW = s * B @ A`` (s = ``alpha / rank``) with A starting from the run's adapter seed
on every process, as in FFA-LoRA (:func:`fedpeft.adapters.lora.seeded_lora_a`), and B at zero.
Rounds alternate: in odd rounds (1, 3, ...) clients train B with A frozen, in even rounds A
with B frozen; the head trains every round. B goes first because it starts at zero: with
B = 0 the gradient of A is zero.
What travels: up, in odd rounds every ``lora_B`` + head, in even rounds every ``lora_A`` +
head (half of LoRA's adapter upload each round); down, the whole global state -- A, B, head
and ``rolora.round`` (the number of finished rounds, set by the server's
:meth:`RoloraPlugin.server_step`; a client derives the round's phase from it, so the phase
follows the server's count and a resumed run continues it). The server checks each reply
against the shape of its phase (:class:`~fedpeft.adapters.capabilities.ReplyVariants`: one
reply spec per phase; a reply must match one of them) and leaves a reply of the other phase
out of the round's average (:meth:`RoloraPlugin.aggregate_multitask`).
Averaging: exact in every round, because only one factor changes: with A fixed
``s * mean_k(B_k) @ A == mean_k(s * B_k @ A)``, with B fixed ``s * B @ mean_k(A_k) ==
mean_k(s * B @ A_k)`` -- the new global dW is exactly the example-weighted mean of the
clients' dW (tested for both phases). The factor nobody sent keeps its global value.
DP-SGD: the round's trainable factor and the head, per-example clipped and noised (the frozen
factor gets no gradient); no frozen-tensor hash (A changes in even rounds).
Strategy: plain FedAvg only (``strategy.name = "fedavg"``): a server optimiser's moments would
mix the two factors' rounds.

Deviations from the paper: the head trains and is averaged every round; no LoRA dropout;
DP-SGD is added (the paper trains without it); A is seeded so that every process builds the
same initial A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import MultiTaskAggregation, ReplyVariants, ServerState
from fedpeft.adapters.common import NDArrays, grouped_aggregate
from fedpeft.adapters.lora import inject_lora, lora_layers
from fedpeft.config import ConfigError, RunConfig

__all__ = ["ROUND_KEY", "RoloraPlugin", "phase"]

ROUND_KEY = "rolora.round"  # [rounds finished]; down only
_ATTR = "_rolora_done"  # the model's copy of that count


def phase(rounds_done: int) -> str:
    """The factor the next round trains: ``"B"`` in odd rounds (rounds_done even), else ``"A"``."""
    return "B" if rounds_done % 2 == 0 else "A"


def _factor(name: str) -> str | None:
    """``"A"``/``"B"`` for a LoRA factor's parameter name, None for the head."""
    return "A" if ".lora_A." in name else "B" if ".lora_B." in name else None


class RoloraPlugin(AdapterPlugin, ReplyVariants, ServerState, MultiTaskAggregation):
    """RoLoRA: odd rounds train and send B (A frozen), even rounds A (B frozen); exact averaging."""

    name = "rolora"
    paper = "RoLoRA (Chen et al., arXiv:2502.01755)"
    travels = "lora_B + head (odd rounds), lora_A + head (even rounds); round count down only"
    exact_average = True

    def validate_config(self, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        if cfg.strategy.name != "fedavg":
            raise ConfigError("strategy.name", cfg.strategy.name, "rolora alternates the factor each round and "
                                                                  "runs with fedavg only")

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """LoRA with A from the seed, B = 0, set for round 1 (B trains, A frozen)."""
        peft_model = inject_lora(model, cfg, freeze_a=False)
        self.set_phase(peft_model, 0)
        return peft_model

    @staticmethod
    def rounds_done(model: nn.Module) -> int:
        return int(getattr(model, _ATTR, 0))

    def set_phase(self, model: nn.Module, rounds_done: int) -> None:
        """Record the server's round count and freeze the factor the next round does not train."""
        setattr(model, _ATTR, rounds_done)
        train = phase(rounds_done)
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.requires_grad_(train == "A")  # type: ignore[index,union-attr]
            layer.lora_B["default"].weight.requires_grad_(train == "B")  # type: ignore[index,union-attr]

    def _shared(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the global state but the round count: both factors and the head
        (the trainable tensors that are no factor)."""
        return {n: p.detach() for n, p in model.named_parameters() if _factor(n) is not None or p.requires_grad}

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install the factors and head; the round count (if sent) sets the phase."""
        state = dict(state)
        count = state.pop(ROUND_KEY, None)
        super().load_state(model, state)
        if count is not None:
            raw = count.detach().cpu().numpy() if isinstance(count, torch.Tensor) else np.asarray(count)
            self.set_phase(model, int(round(float(raw.reshape(-1)[0]))))

    def reply_variants(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """``""``: an odd round's reply (B + head); ``"@A"``: an even round's (A + head)."""
        shared = self._shared(model)
        return {"": {k: v for k, v in shared.items() if _factor(k) != "A"},
                "@A": {k: v for k, v in shared.items() if _factor(k) != "B"}}

    def server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {ROUND_KEY: torch.tensor([float(self.rounds_done(model))])}

    def server_step(self, server_round: int, state: NDArrays, cfg: RunConfig) -> NDArrays:
        """Count the finished round into the state sent with the next round."""
        if ROUND_KEY in state:
            state = {**state, ROUND_KEY: np.asarray([server_round], dtype=state[ROUND_KEY].dtype)}
        return state

    def aggregate_multitask(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray],
        current: Mapping[str, np.ndarray],
    ) -> NDArrays:
        """The weighted mean of the phase's factor and the head over the replies of the phase;
        the other factor keeps ``current``'s value (the state sent out, whose round count says
        the phase). A reply of the other phase (valid in shape, not trained as this round asks)
        is left out entirely, its head too."""
        done = int(round(float(np.asarray(current.get(ROUND_KEY, [0.0])).reshape(-1)[0])))
        other = "A" if phase(done) == "B" else "B"
        kept = [i for i, s in enumerate(states) if not any(_factor(k) == other for k in s)]
        return grouped_aggregate(self, [states[i] for i in kept], [weights[i] for i in kept], previous, current)
