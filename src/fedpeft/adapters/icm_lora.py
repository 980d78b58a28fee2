"""ICM-LoRA, federated: a server-side conditional VAE generates LoRA weights from a task vector.

Paper: Yihua Shao, Minxi Yan, Yang Liu, Siyu Chen, Wenjie Chen, Xinwei Long, Ziyang Yan,
Lei Li, Chenyu Zhang, Nicu Sebe, Hao Tang, Yan Wang, Hao Zhao, Mengzhu Wang, Jingcai Guo,
"In-Context Meta LoRA Generation", IJCAI 2025 (arXiv:2501.17635).

Method as implemented. Every target linear layer gets a LoRA ``W0 x + s B_t A x`` whose A is
shared by all tasks (frozen, generated from the adapter seed, hash-checked each round as in
FFA-LoRA) and whose B_t belongs to the task (``task_<name>``); each task has its own head.
Clients of task t train B_t and the head with DP-SGD, exactly as a multi-task FFA-LoRA with
per-task B. Each client also releases once a *task vector*: the mean of its examples'
L2-normalised sentence embeddings from the frozen base model (the head's input with the
adapter off), clipped and noised (below). On the server (:mod:`fedpeft.adapters.icm_server`) every
round's (task vector, B) reply is one training pair of a small conditional VAE
(:mod:`fedpeft.adapters.cvae`) that maps a task vector to the flattened B of every layer; pairs of
the last ``snapshot_window`` rounds are kept (per-round snapshots, as the paper trains on
several checkpoints per task). For a *held-out task* (``heldout_task``, a shipped task no
client trains on), the server computes its task vector on the task's server-held sample,
generates B with the CVAE (no training: cold start) and evaluates it on the task's test
split against the un-adapted model (B = 0); ``metrics.jsonl`` gets both accuracies.

Head of the held-out task. A generated adapter needs a classifier for the new label set.
Both the generated and the un-adapted model get the *same* kind of head, fitted without
gradient training: nearest class centroid (cosine) on their own features of the server's
labelled sample of that task (``tasks.public_size`` examples; the stand-in for a new client
fitting prototypes on its own data locally). So the comparison is "features with the generated
adapter vs features without it", both read by a prototype head from the same few examples.
As a reference the row also has the accuracy with the B of the trained task whose task vector
is nearest (retrieval instead of generation).

What travels. Up: the own task's B of every layer, the own head and the own task vector
(d floats; released once, re-sent unchanged each round). Down: every task's B, head and task
vector. Never A. Aggregation: B, head and task vector example-weighted within the task's
group; exact for B (dW = s B A is linear in B with A shared; tested) and heads, so
``exact_average`` is True; the task vector average is a mean of noisy means (post-processing).

Privacy cost of the task information. The server learns each client's task (the names of the
tensors it sends) and a noisy mean embedding of its data. The task vector is an extra
release, protected by the Gaussian mechanism: every example's embedding is clipped to norm
1 (normalised), the sum gets N(0, (tv_noise)^2 I) noise, then it is divided by the client's
example count (already reported as its FedAvg weight). That is one ledger entry
``(sigma=tv_noise, q=1, 1 step)`` composed by the run's accountant with the client's DP-SGD
steps (:mod:`fedpeft.privacy.releases`, :mod:`fedpeft.client.task_release`); a new ledger is calibrated
with it included, so DP-SGD's sigma is slightly larger and the total stays within the
target epsilon. The noisy vector is stored next to the client's ledger and never recomputed.
Without DP (``--epsilon inf``) it is clipped but not noised. The held-out task vector and the
prototype heads use server-held data only: no client cost.

Deviations from the paper: the paper's CVAE generates full LoRA weights of language and
vision-language models, conditioned on a task vector taken from the model's own hidden states
over a task description / in-context examples (in-context meta-learning), and is trained on
checkpoints of centrally trained LoRAs; here it generates only B (A is frozen and shared), is a
one-hidden-layer MLP CVAE (not 1-D convolutions), is trained every round on the few (noisy task
vector, client B) pairs of a federation with DP-SGD-trained adapters, and the task vector is a
DP mean of the base model's embeddings of the client's private examples. The held-out head is a prototype head
(the paper's tasks keep their label spaces). In a single-task run (no ``[tasks]``) there is
one shared B and no CVAE: FFA-LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin, float_option, hash_tensors, replace_submodule
from fedpeft.adapters.mtlora import target_linears
from fedpeft.adapters.registry import register
from fedpeft.adapters.triadapt_lora import export_npz, freeze_all_but_head, seeded_normal
from fedpeft.tasks.registry import head_prefixes

if TYPE_CHECKING:  # pragma: no cover
    from fedpeft.config import RunConfig
    from fedpeft.data.sources import TextDataset

__all__ = ["IcmLoraLinear", "IcmLoraPlugin", "icm_layers", "pooled_features"]

TASK_PREFIX = "task_"
TV_MODULE = "icm_tv"
RELEASE_TAG = "task-vector"


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


def _head(model: nn.Module) -> nn.Module:
    prefixes = head_prefixes()
    for prefix in prefixes:
        head = getattr(model, prefix, None)
        if head is not None:
            return head  # type: ignore[no-any-return]
    raise ValueError(f"the model has no {'/'.join(prefixes)} head")


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
def pooled_features(model: nn.Module, tokenizer, texts: tuple[str, ...] | list[str], max_length: int,  # type: ignore[no-untyped-def]
                    batch_size: int = 64) -> torch.Tensor:
    """(n, d) inputs of the classification head (the pooled sentence embedding), in order."""
    from fedpeft.tasks.model import tokenize

    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = _head(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
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


class IcmLoraPlugin(AdapterPlugin):
    """Per-task FFA-LoRA B + DP task vectors; a server CVAE generates B for unseen tasks."""

    name = "icm_lora"
    paper = "ICM-LoRA (Shao et al., IJCAI 2025, arXiv:2501.17635)"
    travels = "own task's lora B + head + DP task vector (released once); A from seed"
    exact_average = True
    options = ("tv_noise", "heldout_task", "snapshot_window", "cvae_steps")

    # ---- options -------------------------------------------------------------------------
    def tv_noise(self, cfg: RunConfig) -> float:
        return float_option(cfg, "tv_noise", 5.0, 0.1, 1e4)

    def heldout(self, cfg: RunConfig) -> str:
        """The held-out task's name, or "" (option ``heldout_task``, default none)."""
        from fedpeft.config import ConfigError
        from fedpeft.config.tasks import SHIPPED_TASKS

        name = str(cfg.adapter.option("heldout_task", "none")).strip()
        if name in ("", "none"):
            return ""
        run = [s.name for s in cfg.tasks.resolved()]
        free = [t for t in SHIPPED_TASKS if t not in run]
        if not cfg.tasks.enabled:
            raise ConfigError("adapter.options.heldout_task", name, "needs a multi-task run (--tasks ...)")
        if name not in free:
            why = "is trained by the run's clients" if name in run else "is not a shipped task"
            raise ConfigError("adapter.options.heldout_task", name,
                              f"{why}; allowed: none, {', '.join(free) or '(every shipped task is in the run)'}")
        if cfg.tasks.public_size < 10:
            raise ConfigError("tasks.public_size", cfg.tasks.public_size,
                              "the held-out task needs a server-held labelled sample: use >= 10")
        return name

    def settings(self, cfg: RunConfig) -> tuple[float, str, int, int]:
        """(tv_noise, heldout_task, snapshot_window, cvae_steps), validated."""
        from fedpeft.adapters.delta_linear import int_option

        return (self.tv_noise(cfg), self.heldout(cfg), int_option(cfg, "snapshot_window", 3, 1, 1000),
                int_option(cfg, "cvae_steps", 400, 1, 100_000))

    def validate_config(self, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        self.settings(cfg)

    # ---- client half -----------------------------------------------------------------------
    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a = cfg.adapter
        self.settings(cfg)
        tasks = tuple(s.name for s in cfg.tasks.resolved())
        freeze_all_but_head(model)
        dim = 0
        for index, (name, linear) in enumerate(target_linears(model, a.target_modules)):
            replace_submodule(model, name, IcmLoraLinear(linear, tasks, a.rank, a.alpha / a.rank, a.seed, index))
        if tasks:
            head = _head(model)
            dim = int(getattr(getattr(model, "config", None), "hidden_size", 0) or next(
                m.in_features for m in head.modules() if isinstance(m, nn.Linear)))
            model.add_module(TV_MODULE, TaskVectors(tasks, dim).to(next(model.parameters()).device))
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors plus the task vector of every task whose head is trainable (a
        client: its own; the server: all)."""
        from fedpeft.data.layout import owned_task

        state = super().trainable_state(model)
        holder = getattr(model, TV_MODULE, None)
        if holder is not None:
            heads = {owned_task(k) for k in state if k.split(".")[0] in head_prefixes()} - {None}
            for task in sorted(str(t) for t in heads):
                state[f"{TV_MODULE}.{TASK_PREFIX}{task}"] = getattr(holder, TASK_PREFIX + task).detach()
        return state

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install the global state; a client then restores its own released task vector."""
        super().load_state(model, state)
        for task, vector in getattr(model, "_icm_own", {}).items():
            self._set_vector(model, task, vector)

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors({f"{n}.down": layer.down.weight for n, layer in icm_layers(model)})

    # ---- the task-vector release (fedpeft.client.task_release) --------------------------------------
    def release_params(self, cfg: RunConfig) -> tuple[str, float, float]:
        """(tag, clip, noise multiplier) of the one-off task-vector release."""
        return RELEASE_TAG, 1.0, self.tv_noise(cfg)

    def release_vectors(self, model: nn.Module, tokenizer, data: TextDataset, cfg: RunConfig) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """(n, d) L2-normalised embeddings of the client's examples by the frozen base model."""
        with adapters_off(model):
            feats = pooled_features(model, tokenizer, data.texts, cfg.model.max_length)
        return F.normalize(feats, dim=1)

    def install_release(self, model: nn.Module, task: str, vector: torch.Tensor) -> None:
        model._icm_own = {task: vector.detach().float().cpu()}  # type: ignore[assignment]
        self._set_vector(model, task, vector)

    @staticmethod
    def _set_vector(model: nn.Module, task: str, vector: torch.Tensor) -> None:
        holder = getattr(model, TV_MODULE, None)
        if holder is not None and hasattr(holder, TASK_PREFIX + task):
            param = getattr(holder, TASK_PREFIX + task)
            with torch.no_grad():
                param.copy_(vector.to(param.device, param.dtype))

    # ---- server half -----------------------------------------------------------------------
    def server_round_end(self, setup: Any, server_round: int, report: Any) -> dict[str, Any]:
        """Learn from this round's (task vector, B) replies; generate and evaluate the held-out
        task's adapter (:class:`fedpeft.adapters.icm_server.IcmServer`, kept on the setup)."""
        from fedpeft.adapters.icm_server import IcmServer

        server = getattr(setup, "_icm_server", None)
        if server is None:
            server = setup._icm_server = IcmServer(setup, self)
        return server.round_end(server_round, report)

    def export(self, model: nn.Module, directory: Path) -> None:
        state: dict[str, Any] = dict(self.trainable_state(model))
        state.update({f"heldout.{k}": v for k, v in getattr(model, "_icm_generated", {}).items()})
        export_npz(state, Path(directory))


register(IcmLoraPlugin())
