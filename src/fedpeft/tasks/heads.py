"""The base model of a task layout: the model's own head for one task, one head per task otherwise.

Every process (server and clients) builds the same model from the configuration alone, so
nothing of it is sent: :func:`layout_base_model` loads the base model with its head
re-initialised from the adapter seed (the run's task type's
:meth:`~fedpeft.tasks.base.TaskType.build_model`). For a
single-task layout (:class:`fedpeft.data.layout.TaskLayout`, ``per_task`` False) that head has
the task's classes (or as many as the federation's label list a deployed node was sent), as
a single-task run always had. For a multi-task layout the final classification layer is
replaced by :class:`MultiTaskHead`: one ``nn.Linear`` per task (``classifier.task_<name>``,
task-owned in the sense of :func:`fedpeft.data.layout.owned_task`), each seeded from the
adapter seed and the task's index -- if the task type has a head at all
(:attr:`~fedpeft.tasks.base.TaskType.head_prefixes`): a causal LM's multi-task model is the
base model itself, and its per-task modules come only from the adapter (MTLoRA's task
branches, MeteoRA's experts; ``task_<name>`` modules). The adapter is attached by the caller
(``plugin.attach``): adapters sit above this layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.layout import TASK_PREFIX, TaskLayout
from fedpeft.tasks.registry import task_for

__all__ = ["MultiTaskHead", "install_heads", "layout_base_model"]


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
    ``prefixes``, the task type's head names, or the last linear inside it) with a
    :class:`MultiTaskHead`."""
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


def layout_base_model(cfg: RunConfig, layout: TaskLayout, label_names: tuple[str, ...] = ()) -> nn.Module:
    """The base model with the layout's heads, on CPU, before ``plugin.attach``.

    ``label_names``: the federation's label list when a deployed node of a single-task run
    received it (its head has that many classes); empty: the task's own pool decides.
    """
    task_type = task_for(cfg)
    heads = layout.per_task and bool(task_type.head_prefixes)  # a causal LM has no head to split per task
    # with per-task heads the model's own head (2 classes) is replaced below
    outputs = 2 if heads else (len(label_names) or task_type.num_outputs(layout[0].pool))
    base = task_type.build_model(cfg.model, outputs, head_seed=cfg.adapter.seed)
    if heads:
        install_heads(base, {t.name: len(t.label_names) for t in layout}, cfg.adapter.seed, task_type.head_prefixes)
    return base
