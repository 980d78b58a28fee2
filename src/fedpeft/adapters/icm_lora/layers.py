"""ICM-LoRA's layer, task-vector holder and feature helpers (client and server share them).

:class:`IcmLoraLinear` is ``W0 x + s B_active A x`` with one A shared by every task (frozen,
seeded) and one B per task; the server's generated B is applied through ``override``.
:class:`TaskVectors` holds one frozen task vector per task (task-owned: it travels with its
head). :func:`pooled_features` reads the head's input (the pooled sentence embedding), and
:func:`adapters_off` runs the frozen base model: together they give the embeddings a task
vector is the mean of (:mod:`fedpeft.adapters.icm_lora.plugin`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.adapters.common import seeded_normal
from fedpeft.data.layout import TASK_PREFIX
from fedpeft.tasks.model import tokenize
from fedpeft.tasks.registry import head_prefixes

__all__ = ["TV_MODULE", "IcmLoraLinear", "TaskVectors", "adapters_off", "head_of", "icm_layers", "pooled_features"]

TV_MODULE = "icm_tv"


class IcmLoraLinear(nn.Module):
    """``W0 x + s B_active A x`` with A shared and frozen; ``override`` replaces B (server)."""

    routes_tasks = True  # fedpeft.data.layout.activate_task sets ``active``

    def __init__(self, base: nn.Linear, tasks: tuple[str, ...], rank: int, scaling: float, seed: int,
                 index: int) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        dev = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)
        with torch.no_grad():
            self.down.weight.copy_(seeded_normal((rank, base.in_features), seed, 30_000 + index,
                                                 base.in_features ** -0.5))
        self.down.weight.requires_grad_(False)
        self.names = tasks or ("",)
        for name in self.names:
            up = nn.Linear(rank, base.out_features, bias=False, device=dev)
            nn.init.zeros_(up.weight)
            self.add_module(self.up_name(name), up)
        self.active = self.names[0]
        self.enabled = True
        self.override: torch.Tensor | None = None

    @staticmethod
    def up_name(task: str) -> str:
        return TASK_PREFIX + task if task else "lora_up"

    def up(self, task: str) -> nn.Linear:
        module: nn.Linear = getattr(self, self.up_name(task))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        h = self.down(x)
        if self.override is not None:
            return out + self.scaling * F.linear(h, self.override.to(x.dtype))
        return out + self.scaling * self.up(self.active)(h)


class TaskVectors(nn.Module):
    """One frozen task vector per task (``task_<name>``; task-owned, travels with the head)."""

    def __init__(self, tasks: tuple[str, ...], dim: int) -> None:
        super().__init__()
        for name in tasks:
            self.register_parameter(TASK_PREFIX + name, nn.Parameter(torch.zeros(dim), requires_grad=False))


def icm_layers(model: nn.Module) -> list[tuple[str, IcmLoraLinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, IcmLoraLinear)), key=lambda x: x[0])


def head_of(model: nn.Module) -> nn.Module:
    """The model's classification head (the first of :func:`fedpeft.tasks.registry.head_prefixes` it has)."""
    for prefix in head_prefixes():
        head = getattr(model, prefix, None)
        if head is not None:
            return head  # type: ignore[no-any-return]
    raise ValueError("the model has no classifier/score head")


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the frozen base model: every ICM layer adds nothing inside the block."""
    layers = [m for _, m in icm_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, before, strict=True):
            m.enabled = e


@torch.no_grad()
def pooled_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                    batch_size: int = 64) -> torch.Tensor:
    """(n, d) inputs of the classification head (the pooled sentence embedding), in order."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = head_of(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, list(texts[start:start + batch_size]), max_length)
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.zeros(0)
