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
adapter off), clipped and noised (below). On the server (:mod:`fedpeft.adapters.icm_lora.server`) every
round's (task vector, B) reply is one training pair of a small conditional VAE
(:mod:`fedpeft.adapters.icm_lora.cvae`) that maps a task vector to the flattened B of every layer; pairs of
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

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import DataRelease, ReleaseParams, ServerRoundContext, ServerRoundWork
from fedpeft.adapters.common import (
    export_npz,
    freeze_all_but_head,
    hash_tensors,
    replace_submodule,
    target_linears,
)
from fedpeft.adapters.icm_lora.layers import (
    TV_MODULE,
    IcmLoraLinear,
    TaskVectors,
    adapters_off,
    head_of,
    icm_layers,
    pooled_features,
)
from fedpeft.adapters.icm_lora.options import IcmOptions
from fedpeft.adapters.icm_lora.server import IcmServer
from fedpeft.adapters.options import parse_options
from fedpeft.config import RunConfig
from fedpeft.data.layout import TASK_PREFIX, owned_task
from fedpeft.data.sources import TextDataset
from fedpeft.tasks.registry import head_prefixes

__all__ = ["IcmLoraPlugin"]

RELEASE_TAG = "task-vector"


class IcmLoraPlugin(AdapterPlugin, DataRelease, ServerRoundWork):
    """Per-task FFA-LoRA B + DP task vectors; a server CVAE generates B for unseen tasks."""

    name = "icm_lora"
    paper = "ICM-LoRA (Shao et al., IJCAI 2025, arXiv:2501.17635)"
    travels = "own task's lora B + head + DP task vector (released once); A from seed"
    exact_average = True
    options_type = IcmOptions
    task_types = ("seq-cls",)
    task_type_refusal = ("its task vector is the pooled sentence embedding a classification head reads, a client's "
                         "task is told by its head, and the held-out evaluation is a prototype classifier over class "
                         "labels; a causal LM has no head, no classes and no pooled embedding")

    def settings(self, cfg: RunConfig) -> IcmOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, IcmOptions, cfg)

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
            head = head_of(model)
            dim = int(getattr(getattr(model, "config", None), "hidden_size", 0) or next(
                m.in_features for m in head.modules() if isinstance(m, nn.Linear)))
            model.add_module(TV_MODULE, TaskVectors(tasks, dim).to(next(model.parameters()).device))
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors plus the task vector of every task whose head is trainable (a
        client: its own; the server: all)."""
        state = super().trainable_state(model)
        holder = getattr(model, TV_MODULE, None)
        if holder is not None:
            prefixes = head_prefixes()
            heads = {owned_task(k) for k in state if k.split(".")[0] in prefixes} - {None}
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
    def release_params(self, cfg: RunConfig) -> ReleaseParams:
        """The one-off task-vector release: unit clip norm, noise multiplier ``tv_noise``."""
        return ReleaseParams(RELEASE_TAG, 1.0, self.settings(cfg).tv_noise)

    def release_vectors(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: TextDataset,
                        cfg: RunConfig) -> torch.Tensor:
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
    def server_round_hook(self, ctx: ServerRoundContext) -> IcmServer:
        """Learn from each round's (task vector, B) replies; generate and evaluate the held-out
        task's adapter (:class:`fedpeft.adapters.icm_lora.server.IcmServer`, kept by the server)."""
        return IcmServer(ctx, self.settings(ctx.cfg))

    def export(self, model: nn.Module, directory: Path) -> None:
        state: dict[str, torch.Tensor | np.ndarray] = dict(self.trainable_state(model))
        state.update({f"heldout.{k}": v for k, v in getattr(model, "_icm_generated", {}).items()})
        export_npz(state, Path(directory))
