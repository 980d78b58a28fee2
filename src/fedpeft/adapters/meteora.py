"""MeteoRA, federated: per-task LoRA experts, then a learned per-token top-k gate over them.

Paper: Jingwei Xu, Junyu Lai, Yunpeng Huang, "MeteoRA: Multiple-tasks Embedded LoRA for
Large Language Models", ICLR 2025 (arXiv:2405.13053).

Method as implemented. Every target linear layer W0 (``adapter.target_modules``) gets one
LoRA *expert* per task t, ``dW_t = s * B_t A_t`` (s = ``alpha / rank``), and a gate
``G`` (T x d_in, T = number of tasks). In the mixture, for each token x: logits
``z = G x``; the ``top_k`` largest are kept and the weights are ``w = softmax(z)`` over the
kept ones only (MeteoRA's ``softmax(TopK(G x))``); the layer computes
``W0 x + s * sum_t w_t B_t A_t x``. Computed densely: all T experts' ``A_t x`` in one matmul
(the A of every expert stacked), weighted per token, one matmul through the stacked B --
no gather/scatter, CPU-friendly. Under classification each task keeps its own classification
head (:mod:`fedpeft.data.layout`); a causal LM (``task_type = "causal-lm"``, the paper's own
setting: instruction tasks on a decoder, trained here on the completion loss) has none, so a
gate-round reply is the gates alone, identical in shape for every task (the server does not
learn the task from it: ``clients_task_unknown`` in ``metrics.jsonl``).

Federation: two phases in one run, driven by the server. ``expert_rounds`` (option, default
``ceil(rounds / 2)``) rounds of *expert training*: a client of task t trains only its expert
B_t (``W0 x + s B_t A_t x``, the task's own LoRA as in the paper, where the experts are
LoRAs fine-tuned per task) and its head. Then *gate training* for the remaining rounds: the
experts are frozen and every client trains the gates of all layers (and its head) through the
full mixture on its own data. The server sends the schedule in the global state
(``meteora.schedule`` = [rounds done, expert rounds], down only); a client derives its phase from it.
What travels up -- expert phase: the own task's B_t of every layer + own head (A never: frozen,
seeded, hash-checked as in FFA-LoRA); gate phase: every layer's gate + own head. Down: the
whole global state (every expert, gate, head, the schedule).
Aggregation: experts and heads example-weighted within the task's group -- exact (dW_t is
linear in B_t with A_t fixed; tested); gates example-weighted over every client -- *not*
exact (the gate is non-linear in G), so ``exact_average`` is False. A reply carrying tensors of
the other phase has them ignored (:meth:`MeteoraPlugin.aggregate_multitask`).

Privacy cost of routing / task information. The server learns which task each client holds
(the expert and head it sends, as in MTLoRA). Routing itself costs nothing extra: the gate is
trained by DP-SGD like any weight (its per-example gradients are clipped and noised with the
rest; the layer has an exact Opacus grad sampler, tested against per-example autograd), and
no routing statistics leave a client. The routing share reported in ``metrics.jsonl``
(``meteora_routing_own_expert``) is computed by the server on its own public sample.

Evaluation: a round's ``accuracy_per_task`` uses what that round trained -- after an expert
round each task is evaluated with its own expert (the server knows the task of its test
split: oracle routing), after a gate round with the mixture (no task identity inside the
adapter; the head is still the task's). The layer uses the *training* phase of the next round
in ``train()`` mode (clients) and the phase of the last finished round in ``eval()`` mode.

Deviations from the paper (it embeds LoRAs of 28 tasks into LLaMA and trains the gate on the
autoregressive loss; here BERT-style encoders and text classification):
* experts are trained federatedly inside the same run (FFA-style: A frozen from the seed so
  that averaging B within a task is exact), not taken from separately fine-tuned LoRAs;
* the gate is trained by all clients with DP-SGD and averaged (FedAvg of a non-linear gate);
* per-task heads, also trained in the gate phase; no auxiliary load-balancing loss;
* dense computation instead of the paper's custom forward-acceleration kernels;
* ``top_k`` >= 2 (default 2): with softmax over a single kept logit the weight is always 1 and
  the gate would get no gradient;
* in a single-task run (no ``[tasks]``) there is one expert and no gate: FFA-LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import (
    MetricsRow,
    MultiTaskAggregation,
    ReplyVariants,
    RoundOutcome,
    ServerRoundContext,
    ServerRoundWork,
    ServerState,
)
from fedpeft.adapters.common import (
    NDArrays,
    export_npz,
    freeze_all_but_head,
    grouped_aggregate,
    hash_tensors,
    replace_submodule,
    seeded_normal,
    target_linears,
)
from fedpeft.adapters.options import option, parse_options
from fedpeft.config import RunConfig
from fedpeft.data.layout import TASK_PREFIX
from fedpeft.tasks.registry import head_prefixes

__all__ = ["MeteoRALinear", "MeteoraOptions", "MeteoraPlugin", "MeteoraRoundEnd", "meteora_layers"]

SCHEDULE_KEY = "meteora.schedule"  # [rounds done, expert rounds]


def _n_tasks(cfg: RunConfig) -> int:
    return max(1, len(cfg.tasks.resolved()))


@dataclass(frozen=True, kw_only=True)
class MeteoraOptions:
    """``expert_rounds`` (default ``ceil(rounds / 2)``) and the gate's ``top_k`` (>= 2 with
    several tasks: softmax over a single selected logit is 1, the gate would get no gradient)."""

    expert_rounds: int = option(lambda cfg: max(1, math.ceil(cfg.train.rounds / 2)), low=1,
                                high=lambda cfg: cfg.train.rounds)
    top_k: int = option(lambda cfg: min(2, _n_tasks(cfg)), low=lambda cfg: min(2, _n_tasks(cfg)), high=_n_tasks)


def expert_name(task: str) -> str:
    """Parameter name of a task's B (task-owned: ``task_<name>``); ``lora_B`` without tasks."""
    return TASK_PREFIX + task if task else "lora_B"


class MeteoRAState(nn.Module):
    """The server's schedule ``[rounds done, expert rounds]`` (frozen; travels down only)."""

    def __init__(self, expert_rounds: int) -> None:
        super().__init__()
        self.schedule = nn.Parameter(torch.tensor([0.0, float(expert_rounds)]), requires_grad=False)


def read_schedule(state: Mapping[str, Any]) -> tuple[int, int] | None:
    """(rounds done, expert rounds) from a global state, or None (single task: no gate)."""
    if SCHEDULE_KEY not in state:
        return None
    v = np.asarray(state[SCHEDULE_KEY], dtype=np.float64).reshape(-1)
    return int(round(v[0])), int(round(v[1]))


class MeteoRALinear(nn.Module):
    """``W0 x + s * sum_t w_t(x) B_t A_t x`` (mixture) or ``W0 x + s B_a A_a x`` (expert a)."""

    routes_tasks = True  # fedpeft.data.layout.activate_task sets ``active``

    def __init__(self, base: nn.Linear, tasks: Sequence[str], rank: int, scaling: float, top_k: int,
                 seed: int, index: int) -> None:
        super().__init__()
        self.base, self.rank, self.scaling, self.top_k = base, rank, scaling, top_k
        self.names = tuple(tasks) or ("",)
        dev, d_in = base.weight.device, base.in_features
        blocks = [seeded_normal((rank, d_in), seed, 10_000 + 100 * index + j, d_in ** -0.5)
                  for j in range(len(self.names))]
        # frozen nn.Parameters, not buffers: Opacus refuses trainable modules holding buffers
        self.lora_A = nn.Parameter(torch.cat(blocks).to(dev), requires_grad=False)
        for name in self.names:
            self.register_parameter(expert_name(name), nn.Parameter(torch.zeros(base.out_features, rank, device=dev)))
        self.gate = nn.Parameter(seeded_normal((len(self.names), d_in), seed, 20_000 + index, 0.02).to(dev)) \
            if len(self.names) > 1 else None
        self.active = self.names[0]
        self.train_mode = self.eval_mode = "expert"  # "expert" | "mix"
        self.counts: torch.Tensor | None = None  # top-1 routing counts (server diagnostics)
        self.token_mask: torch.Tensor | None = None

    @property
    def n_experts(self) -> int:
        return len(self.names)

    def experts(self) -> list[torch.Tensor]:
        return [getattr(self, expert_name(n)) for n in self.names]

    @property
    def mode(self) -> str:
        return self.train_mode if self.training else self.eval_mode

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(selection mask m, weights w = softmax over the top-k logits) for ``x`` (..., d_in)."""
        assert self.gate is not None
        z = F.linear(x, self.gate.to(x.dtype))
        with torch.no_grad():
            chosen = torch.topk(z, self.top_k, dim=-1).indices
            mask = torch.zeros_like(z).scatter_(-1, chosen, 1.0)
        w = torch.softmax(z.masked_fill(mask == 0, float("-inf")), dim=-1)
        return mask, w

    def _count(self, x: torch.Tensor) -> None:
        if self.counts is None or self.gate is None:
            return
        with torch.no_grad():
            top1 = F.one_hot(F.linear(x, self.gate.to(x.dtype)).argmax(-1), self.n_experts).to(torch.float64)
            if self.token_mask is not None and self.token_mask.shape == x.shape[:-1]:
                top1 = top1 * self.token_mask[..., None].to(top1.dtype)
            self.counts += top1.reshape(-1, self.n_experts).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        r = self.rank
        if self.mode == "expert" or self.gate is None:
            j = self.names.index(self.active)
            h = F.linear(x, self.lora_A[j * r:(j + 1) * r].to(x.dtype))
            return self.base(x) + self.scaling * F.linear(h, self.experts()[j].to(x.dtype))
        h = F.linear(x, self.lora_A.to(x.dtype)).unflatten(-1, (self.n_experts, r))
        _, w = self.routing(x)
        b_all = torch.cat(self.experts(), dim=1).to(x.dtype)  # (d_out, T * r)
        return self.base(x) + self.scaling * F.linear((h * w[..., None]).flatten(-2), b_all)


@register_grad_sampler(MeteoRALinear)
def _meteora_grad_sampler(
    layer: MeteoRALinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[Any, torch.Tensor]:
    """Exact per-sample gradients of the experts and the gate (Opacus hooks mode).

    Expert mode: dL/dB_a = s * sum_tokens gy h_a^T. Mixture, with u_t = s * gy . (B_t h_t):
    dL/dB_t = s * sum_tokens gy (w_t h_t)^T; dL/dz_j = m_j w_j (u_j - sum_i w_i u_i);
    dL/dG = sum_tokens dz x^T. Parameters that do not require grad get nothing.
    """
    x = activations[0].to(backprops.dtype)
    s, r, experts = layer.scaling, layer.rank, layer.experts()
    out: dict[Any, torch.Tensor] = {}  # keyed by the layer's nn.Parameters
    with torch.no_grad():
        if layer.mode == "expert" or layer.gate is None:
            j = layer.names.index(layer.active)
            h = F.linear(x, layer.lora_A[j * r:(j + 1) * r].to(x.dtype))
            for i, b in enumerate(experts):
                if b.requires_grad:
                    out[b] = s * torch.einsum("n...o,n...r->nor", backprops, h) if i == j else \
                        torch.zeros((len(x), *b.shape), dtype=x.dtype, device=x.device)
            if layer.gate is not None and layer.gate.requires_grad:
                out[layer.gate] = torch.zeros((len(x), *layer.gate.shape), dtype=x.dtype, device=x.device)
            return out
        h = F.linear(x, layer.lora_A.to(x.dtype)).unflatten(-1, (layer.n_experts, r))  # (n, ..., T, r)
        mask, w = layer.routing(x)
        for t, b in enumerate(experts):
            if b.requires_grad:
                out[b] = s * torch.einsum("n...o,n...r->nor", backprops, w[..., t, None] * h[..., t, :])
        if layer.gate.requires_grad:
            b_all = torch.cat(experts, dim=1).to(x.dtype)
            u = s * ((backprops @ b_all).unflatten(-1, (layer.n_experts, r)) * h).sum(-1)  # (n, ..., T)
            dz = mask * w * (u - (w * u).sum(-1, keepdim=True))
            out[layer.gate] = torch.einsum("n...t,n...i->nti", dz, x)
    return out


def meteora_layers(model: nn.Module) -> list[tuple[str, MeteoRALinear]]:
    return sorted(((n, m) for n, m in model.named_modules() if isinstance(m, MeteoRALinear)), key=lambda x: x[0])


def _is_gate(name: str) -> bool:
    return name.endswith(".gate")


def _is_expert(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return (last.startswith(TASK_PREFIX) or last == "lora_B") and not any(h in name for h in head_prefixes())


class MeteoraPlugin(AdapterPlugin, ReplyVariants, ServerState, MultiTaskAggregation, ServerRoundWork):
    """Per-task FFA-LoRA experts (phase 1), then a federated per-token top-k gate (phase 2)."""

    name = "meteora"
    paper = "MeteoRA (Xu, Lai, Huang, ICLR 2025)"
    travels = "own task's expert B + head (expert rounds), gates + head (gate rounds); A from seed; schedule down"
    exact_average = False
    options_type = MeteoraOptions

    def settings(self, cfg: RunConfig) -> MeteoraOptions:
        """This run's options, typed and checked (one-line ConfigError otherwise)."""
        return parse_options(self.name, MeteoraOptions, cfg)

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        a, opts = cfg.adapter, self.settings(cfg)
        expert_rounds, top_k = opts.expert_rounds, opts.top_k
        tasks = tuple(s.name for s in cfg.tasks.resolved())
        freeze_all_but_head(model)
        for index, (name, linear) in enumerate(target_linears(model, a.target_modules)):
            replace_submodule(model, name, MeteoRALinear(linear, tasks, a.rank, a.alpha / a.rank, top_k, a.seed, index))
        if len(tasks) > 1:
            model.meteora = MeteoRAState(expert_rounds).to(next(model.parameters()).device)  # type: ignore[assignment]
        return model

    # ---- phases ------------------------------------------------------------------------
    @staticmethod
    def phase(rounds_done: int, expert_rounds: int) -> str:
        """What the next round trains: ``expert`` while rounds_done < expert_rounds, else ``mix``."""
        return "expert" if rounds_done < expert_rounds else "mix"

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install the global state, then set the phase from the server's round counter: in
        the expert phase the gates are frozen, in the gate phase the experts."""
        super().load_state(model, state)
        schedule = read_schedule({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        if schedule is None:
            return
        done, expert_rounds = schedule
        train = self.phase(done, expert_rounds)
        evaluate = "expert" if done <= expert_rounds else "mix"
        for _, layer in meteora_layers(model):
            layer.train_mode, layer.eval_mode = train, evaluate
            if train == "expert" and layer.gate is not None:
                layer.gate.requires_grad_(False)
            if train == "mix":
                for b in layer.experts():
                    b.requires_grad_(False)

    def reply_variants(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The active task's reply in each phase: ``""`` experts + head, ``"@gate"`` gates + head."""
        state = super().trainable_state(model)
        variants = {"": {k: v for k, v in state.items() if not _is_gate(k)}}
        if any(_is_gate(k) for k in state):
            variants["@gate"] = {k: v for k, v in state.items() if not _is_expert(k)}
        return variants

    def server_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Down-only tensors: the schedule (rounds done, expert rounds; decides each client's phase)."""
        holder = getattr(model, "meteora", None)
        return {SCHEDULE_KEY: holder.schedule.detach()} if isinstance(holder, MeteoRAState) else {}

    def server_step(self, server_round: int, state: NDArrays, cfg: RunConfig) -> NDArrays:
        """Count the finished round into the schedule sent with the next round."""
        schedule = read_schedule(state)
        if schedule is not None:
            state = {**state, SCHEDULE_KEY: np.asarray([server_round, schedule[1]], dtype=state[SCHEDULE_KEY].dtype)}
        return state

    def aggregate_multitask(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], previous: Mapping[str, np.ndarray],
        current: Mapping[str, np.ndarray],
    ) -> NDArrays:
        """The grouped rule (experts and heads per task, gates over all), after dropping any
        tensor of the other phase (the phase follows the round counter sent out)."""
        done, expert_rounds = read_schedule(current) or (0, 1)
        wrong = _is_gate if self.phase(done, expert_rounds) == "expert" else _is_expert
        kept = [{k: v for k, v in s.items() if not wrong(k)} for s in states]
        return grouped_aggregate(self, kept, weights, previous, current)

    def server_round_hook(self, ctx: ServerRoundContext) -> MeteoraRoundEnd:
        return MeteoraRoundEnd(ctx, self.settings(ctx.cfg).expert_rounds)

    def frozen_fingerprint(self, model: nn.Module) -> str:
        return hash_tensors({f"{n}.lora_A": layer.lora_A for n, layer in meteora_layers(model)})

    def export(self, model: nn.Module, directory: Path) -> None:
        keep = getattr(model, "_fedpeft_trainable", None)
        state = {n: p.detach() for n, p in model.named_parameters() if (p.requires_grad if keep is None else n in keep)}
        export_npz({**state, **self.server_state(model)}, Path(directory))


class MeteoraRoundEnd:
    """Server diagnostics after each round: the phase just trained and, with a gate, the
    share of each task's public tokens whose top-1 expert is the task's own (server-held
    text: no client cost)."""

    def __init__(self, ctx: ServerRoundContext, expert_rounds: int) -> None:
        self.ctx, self.expert_rounds = ctx, expert_rounds

    def round_end(self, server_round: int, outcome: RoundOutcome) -> MetricsRow:
        ctx, model = self.ctx, self.ctx.model
        row: MetricsRow = {"meteora_phase": "experts" if server_round <= self.expert_rounds else "gate",
                           "meteora_expert_rounds": self.expert_rounds}
        layers = meteora_layers(model)
        if not layers or layers[0][1].gate is None or not any(len(t.public) for t in ctx.tasks):
            return row
        share: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            for task in ctx.tasks:
                for _, layer in layers:
                    layer.counts = torch.zeros(layer.n_experts, dtype=torch.float64)
                with torch.no_grad():
                    for name, batch in ctx.public_batches():
                        if name == task.name:
                            for _, layer in layers:
                                layer.token_mask = batch.get("attention_mask")
                            model(**batch)
                own = [float(layer.counts[layer.names.index(task.name)] / layer.counts.sum().clamp(min=1))
                       for _, layer in layers if layer.counts is not None]
                share[task.name] = float(np.mean(own))
        finally:
            for _, layer in layers:
                layer.counts, layer.token_mask = None, None
            model.train(was_training)
        row["meteora_routing_own_expert"] = share
        return row
