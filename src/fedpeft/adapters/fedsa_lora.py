"""FedSA-LoRA: LoRA whose A matrices are shared and averaged, whose B matrices stay on the client.

Paper: Pengxin Guo, Shuang Zeng, Yanran Wang, Huijie Fan, Feifei Wang, Liangqiong Qu,
"Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025
(arXiv:2410.01463).

Method: every client trains both LoRA factors of ``dW_k = s * B_k @ A`` (s = ``alpha / rank``),
the paper's finding being that A learns what the clients share and B what is their own. A
starts from the run's adapter seed on every process (:func:`fedpeft.adapters.lora.seeded_lora_a`),
B at zero on every fresh client.
What travels: every ``lora_A`` and the classification head, up and down; never ``lora_B``.
Each client's B is its local state (:meth:`FedSaLoraPlugin.local_state`): the ClientApp keeps
it in the node's ``Context.state`` and on the node's own disk between rounds
(:mod:`fedpeft.client.app`, :mod:`fedpeft.client.node_store`) and installs it after the global
state; a client seen for the first time starts with B = 0.
Averaging: the server's rule is the example-weighted mean of A (and the head), and it is
exact for what it claims: client k's personalised update with the averaged A is linear in A
for its own fixed B_k, ``s * B_k @ mean_j(A_j) == mean_j(s * B_k @ A_j)`` (tested). There is
no global dW to be exact about: each client's model is its own.
DP-SGD: A, B and the head all train with per-example clipping and noise (one clip over all
three, as any jointly trained parameters); A is the only adapter part that leaves the node,
and B, kept there, is a DP output too (the whole training trajectory is).

Server evaluation (``metrics.jsonl``'s accuracy): the server never holds a B, so its model is
W0 + s * 0 @ A + the averaged head -- the adapter contributes nothing there, and the number
measures the shared head alone, a lower bound that is **not** the method's score (as for
MTLoRA's ``task_modules = "local"``). The paper evaluates each client's personalised model on
that client's own test data: option ``eval_fraction`` > 0 (seq-cls only) does that
(:class:`~fedpeft.adapters.capabilities.PersonalEval`, :mod:`fedpeft.client.personal_eval`):
each client holds that share of its data out of training, and in the last round, before
training, evaluates the global A and head with its own B on it; under DP the accuracy is a
Gaussian release at noise multiplier ``eval_sigma``, planned into the client's ledger from
round 1 and recorded there before it is sent (``personal_accuracy`` in the last round's row).

Deviations from the paper: the head is shared and averaged like A (the paper's NLU heads are
not discussed as local; sharing it gives the server a usable model), no LoRA dropout, A is
seeded so that every client starts from the same A (FedAvg of A needs a common start), and
DP-SGD is added (the paper trains without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import PersonalEval, PersonalEvalParams
from fedpeft.adapters.common import NDArrays
from fedpeft.adapters.lora import inject_lora, lora_layers
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import ConfigError, RunConfig

__all__ = ["FedSaLoraOptions", "FedSaLoraPlugin", "is_local_b"]


@dataclass(frozen=True, kw_only=True)
class FedSaLoraOptions:
    """``eval_fraction``: share of each client's data held out of training for its personalised
    evaluation (0: none); ``eval_sigma``: noise multiplier of that accuracy's DP release."""

    eval_fraction: float = option(0.0, low=0.0, high=0.5)
    eval_sigma: float = option(8.0, low=0.5, high=1e4)


def is_local_b(name: str) -> bool:
    """A parameter name of a client-kept B matrix."""
    return ".lora_B." in name


class FedSaLoraPlugin(AdapterPlugin, PersonalEval):
    """FedSA-LoRA: A and B train; A (and the head) travel and average; B stays on the client."""

    name = "fedsa_lora"
    paper = "FedSA-LoRA (Guo et al., ICLR 2025)"
    travels = "lora_A + head (B stays on the client: local state)"
    exact_average = True  # averaging A is exact for every client's own B (module doc)
    central_dp_compatible = True  # default aggregate (weighted mean), identity server_step
    options_type = FedSaLoraOptions

    def validate_config(self, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        if self.personal_eval_params(cfg).fraction > 0 and cfg.task_type != "seq-cls":
            raise ConfigError("adapter.options.eval_fraction", self.personal_eval_params(cfg).fraction,
                              "the personalised evaluation releases an accuracy (a mean of 0/1 per example): "
                              "task_type seq-cls only")

    def settings(self, cfg: RunConfig) -> FedSaLoraOptions:
        return parse_options(self.name, FedSaLoraOptions, cfg)

    def personal_eval_params(self, cfg: RunConfig) -> PersonalEvalParams:
        opts = self.settings(cfg)
        return PersonalEvalParams(opts.eval_fraction, opts.eval_sigma)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        return inject_lora(model, cfg, freeze_a=False)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and not is_local_b(n)}
        assert not any(is_local_b(n) for n in state), "FedSA-LoRA must never send lora_B"
        return state

    def local_state(self, model: nn.Module) -> NDArrays:
        return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if is_local_b(n)}

    def load_local_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """This client's B; an empty ``state`` (a client's first round) resets every B to zero."""
        params = {n: p for n, p in model.named_parameters() if is_local_b(n)}
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"unknown local tensor {sorted(unknown)[0]!r} for method {self.name}")
        if state and set(state) != set(params):
            raise KeyError(f"local state lacks {len(set(params) - set(state))} of the {len(params)} lora_B tensors")
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].weight.zero_()  # type: ignore[index,operator]
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(np.asarray(value)).to(params[name].device, params[name].dtype))
