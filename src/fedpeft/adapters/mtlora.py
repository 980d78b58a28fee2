"""MTLoRA, federated: task-agnostic LoRA everywhere plus task-specific LoRA in the last blocks.

Paper: Ahmed Agiza, Marina Neseem, Sherief Reda, "MTLoRA: Low-Rank Adaptation Approach for
Efficient Multi-Task Learning", CVPR 2024 (arXiv:2403.20320).

Method as implemented. Every target linear layer (``adapter.target_modules``) gets a
*task-agnostic* low-rank module (TA-LoRA), ``dW_shared = s * B @ A``. In the last
``task_layers`` encoder blocks (option, default 1) each target layer also gets one
*task-specific* low-rank module per task (TS-LoRA), ``dW_t = s * B_t @ A_t``, so for an input
of task t the layer computes ``W0 x + dW_shared x + dW_t x``. s = ``alpha / rank``. Under
classification each task has its own classification head (:mod:`fedpeft.data.layout`); a
causal LM (``task_type = "causal-lm"``, one instruction task per client) has no head, and the
TS-LoRA Bs are a task's only own tensors (with ``task_modules = "local"`` or ``task_layers = 0``
a reply then carries no task-owned tensor: the server cannot tell its task, and reports it in
``clients_task_unknown``).

Federation. FFA-style: every A (shared and per task) is frozen and generated from the
adapter seed on every process (its hash is checked each round), every B starts at zero and
trains with the head. What travels, up: the shared Bs of every target layer, the client's
own task's Bs and its own head -- never another task's. Down: the whole global state (every
task's Bs and heads). Aggregation: the shared Bs are averaged over all clients, the
task-specific Bs and the head only within the task's group (:mod:`fedpeft.strategies.multitask_avg`).
Both are exact: with A fixed, dW is linear in B, so s * mean_k(B_k) @ A == mean_k(s * B_k @ A)
within any group. Privacy cost of the grouping: the server learns which task each client
holds (the names of the tensors it sends). ``task_modules = "local"`` keeps the
task-specific Bs on the client instead (never sent; restored per client from the node's
state each round) -- the server then still learns the task from the head it receives, and
its evaluation sees only the shared part plus the heads (the task-specific Bs stay zero
there), so in that mode the server's per-task accuracy is a lower bound.
DP: yes; all trained tensors are weights of plain ``nn.Linear`` modules (Opacus's own grad
sampler), and only the active task's modules are trainable during a client's round.

Deviations from the paper (Swin-Transformer dense prediction there; text classification
with a BERT-style encoder here):
* TS-LoRA branches only in the last ``task_layers`` blocks, and only the client's own task's
  branch is computed (one task per client); the paper computes every task's branch in one
  pass and feeds multi-scale task-specific features from the last block of every stage to
  per-task decoders -- here the heads read the pooled output of the final block.
* A is frozen (FFA-LoRA style) so that averaging is exact; the paper trains A and B. TS-LoRA's
  per-task A is separate (seeded), not shared with the task-agnostic module.
* The paper also unfreezes patch embedding / norm layers in some variants; here only the
  low-rank B matrices and the heads train. No LoRA dropout. In a single-task run (no
  ``[tasks]``) there are no task-specific modules and the method reduces to FFA-LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.common import (
    NDArrays,
    export_npz,
    freeze_all_but_head,
    hash_tensors,
    replace_submodule,
    seeded_normal,
    target_linears,
)
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig
from fedpeft.data.layout import TASK_PREFIX  # task-owned module names (fedpeft.data.layout.owned_task)

__all__ = ["LowRank", "MTLoRALinear", "MTLoraOptions", "MTLoraPlugin", "block_index", "delta_weights"]

_BLOCK = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True, kw_only=True)
class MTLoraOptions:
    """``task_layers``: how many last blocks get task-specific modules; ``task_modules``:
    ``group`` (averaged per task) or ``local`` (kept on the client, never sent)."""

    task_layers: int = option(1, low=0, high=1000)
    task_modules: str = option("group", choices=("group", "local"))


def block_index(name: str) -> int | None:
    """The encoder block of a module (first numeric path segment, e.g. ``layer.5.``)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


class LowRank(nn.Module):
    """``s * up(down(x))``: ``down`` (A) frozen and seeded, ``up`` (B) trainable from zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scaling: float, seed: int, index: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.scaling = scaling
        self.down = nn.Linear(d_in, rank, bias=False, device=device)
        self.up = nn.Linear(rank, d_out, bias=False, device=device)
        with torch.no_grad():
            self.down.weight.copy_(seeded_normal((rank, d_in), seed, index, d_in ** -0.5))
            self.up.weight.zero_()
        self.down.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.up.weight @ self.down.weight


class MTLoRALinear(nn.Module):
    """``base(x) + shared(x) [+ task_<active>(x)]`` (the task branch only in the last blocks)."""

    routes_tasks = True  # fedpeft.data.layout.activate_task sets ``active``

    def __init__(self, base: nn.Linear, tasks: tuple[str, ...], rank: int, scaling: float, seed: int, index: int) -> None:
        super().__init__()
        self.base = base
        dev = base.weight.device
        # seed index: 1000 per layer (shared branch, then one per task)
        self.shared = LowRank(base.in_features, base.out_features, rank, scaling, seed, index * 1000, dev)
        for j, task in enumerate(tasks):
            self.add_module(TASK_PREFIX + task, LowRank(base.in_features, base.out_features, rank, scaling, seed,
                                                        index * 1000 + 1 + j, dev))
        self.tasks = tasks
        self.active = tasks[0] if tasks else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x) + self.shared(x)
        if self.tasks:
            out = out + getattr(self, TASK_PREFIX + self.active)(x)
        return out


def _layers(model: nn.Module) -> list[tuple[str, MTLoRALinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, MTLoRALinear)), key=lambda x: x[0])


class MTLoraPlugin(AdapterPlugin):
    """MTLoRA with frozen seeded A: shared Bs averaged by all, task Bs and heads per task."""

    name = "mtlora"
    paper = "MTLoRA (Agiza, Neseem, Reda, CVPR 2024)"
    travels = "shared lora B + own task's lora B (last blocks) + own head; A from seed"
    exact_average = True
    options_type = MTLoraOptions

    def settings(self, cfg: RunConfig) -> MTLoraOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, MTLoraOptions, cfg)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a = cfg.adapter
        opts = self.settings(cfg)
        task_layers, mode = opts.task_layers, opts.task_modules
        tasks = tuple(s.name for s in cfg.tasks.resolved())
        freeze_all_but_head(model)
        found = target_linears(model, a.target_modules)
        blocks = [b for b in (block_index(n) for n, _ in found) if b is not None]
        first_task_block = (max(blocks) + 1 - task_layers) if blocks else 1 << 30
        for index, (name, linear) in enumerate(found):
            b = block_index(name)
            branch_tasks = tasks if (b is not None and b >= first_task_block and task_layers > 0) else ()
            replace_submodule(model, name, MTLoRALinear(linear, branch_tasks, a.rank, a.alpha / a.rank, a.seed, index))
        model._mtlora_mode = mode  # type: ignore[assignment]
        return model

    @staticmethod
    def _local(model: nn.Module) -> bool:
        return getattr(model, "_mtlora_mode", "group") == "local"

    def _is_task_lora(self, name: str) -> bool:
        return f".{TASK_PREFIX}" in name and name.endswith(".up.weight")

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        if self._local(model):
            state = {k: v for k, v in state.items() if not self._is_task_lora(k)}
        return state

    def local_state(self, model: nn.Module) -> NDArrays:
        if not self._local(model):
            return {}
        return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters()
                if p.requires_grad and self._is_task_lora(n)}

    def load_local_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        if not self._local(model):
            return
        with torch.no_grad():
            for n, p in model.named_parameters():
                if self._is_task_lora(n):  # a fresh client starts its task modules at zero
                    p.copy_(torch.as_tensor(state[n]) if n in state else torch.zeros_like(p))

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors({n: p for n, p in model.named_parameters() if n.endswith(".down.weight")})

    def export(self, model: nn.Module, directory: Path) -> None:
        export_npz(self.trainable_state(model), Path(directory))


def delta_weights(model: nn.Module, task: str | None = None) -> dict[str, torch.Tensor]:
    """Effective dW of every adapted layer for ``task`` (shared part only when None)."""
    out = {}
    for name, layer in _layers(model):
        dw = layer.shared.delta_weight()
        if task is not None and layer.tasks:
            dw = dw + getattr(layer, TASK_PREFIX + task).delta_weight()
        out[name] = dw.detach()
    return out
