"""One classification head per task of a multi-task federation (``[tasks]``).

The model's final classification layer is replaced by :class:`MultiTaskHead`, one
``nn.Linear`` per task (``<head>.task_<name>``) with that task's number of classes,
initialised from the adapter seed. Only the active task's head is called
(:func:`fedpeft.data.layout.activate_task` routes it); the heads are task-owned parameters.
Heads are found by the run's task type's :attr:`~fedpeft.tasks.base.TaskType.head_prefixes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.layout import TASK_PREFIX, task_layout
from fedpeft.tasks.registry import task_for

__all__ = ["MultiTaskHead", "build_multitask_model", "install_heads"]


class MultiTaskHead(nn.Module):
    """One linear classifier per task; ``active`` selects which one ``forward`` uses."""

    routes_tasks = True  # activate_task sets ``active``

    def __init__(self, in_features: int, classes: dict[str, int], seed: int, std: float = 0.02) -> None:
        super().__init__()
        self.tasks = tuple(classes)
        self.active = self.tasks[0]
        for index, (name, n) in enumerate(classes.items()):
            layer = nn.Linear(in_features, n)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 50_000 + index)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
                layer.bias.zero_()
            self.add_module(TASK_PREFIX + name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head: nn.Module = getattr(self, TASK_PREFIX + self.active)
        return head(x)


def install_heads(model: nn.Module, classes: dict[str, int], seed: int, prefixes: Sequence[str]) -> nn.Module:
    """Replace the model's final classification ``nn.Linear`` (the module named by one of
    ``prefixes``, or the last linear inside it) with a :class:`MultiTaskHead`."""
    for prefix in prefixes:
        head = getattr(model, prefix, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
            setattr(model, prefix, MultiTaskHead(head.in_features, classes, seed, std))
            return model
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            name, last = linears[-1]
            parent = head.get_submodule(name.rsplit(".", 1)[0]) if "." in name else head
            setattr(parent, name.split(".")[-1], MultiTaskHead(last.in_features, classes, seed))
            return model
    raise ConfigError("tasks.names", ",".join(classes),
                      f"the model has no {'/'.join(prefixes) or 'classification'} head to split per task")


def build_multitask_model(cfg: RunConfig, plugin) -> nn.Module:  # type: ignore[no-untyped-def]
    """Base model + one head per task + the adapter (``plugin.attach``), on CPU.

    Identical in every process: heads and seeded adapter tensors come from the seeds."""
    task_type = task_for(cfg)
    classes = {t.name: len(t.label_names) for t in task_layout(cfg)}
    base = task_type.build_model(cfg.model, 2, head_seed=cfg.adapter.seed)
    install_heads(base, classes, cfg.adapter.seed, task_type.head_prefixes)
    return plugin.attach(base, cfg)
