"""MeteoRA (src/fedpeft/adapters/meteora.py): top-k gate, per-sample gradients, phases, aggregation, a
real Flower simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_model import adapter_alone_lowers_loss, assert_learns_beyond_random
from torch import nn

from fedpeft.adapters.meteora import SCHEDULE_KEY, MeteoRALinear, meteora_layers
from fedpeft.cli.main import main as cli_main
from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.layout import activate_task, owned_task
from fedpeft.load import parse_config
from fedpeft.server.setup import ServerSetup

TASKS = "rt,bbc,tweets"


def _cfg(tiny_model_dir: Path, **extra: Any) -> RunConfig:
    return parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 48,
        "data.test_size": 30, "train.batch_size": 16, "train.local_steps": 2, "train.rounds": 4,
        "tasks.names": TASKS, "tasks.public_size": 16, "adapter.method": "meteora", **extra,
    })


def _layer(n_tasks: int = 3, top_k: int = 2) -> MeteoRALinear:
    torch.manual_seed(0)
    layer = MeteoRALinear(nn.Linear(6, 5), tuple(f"t{i}" for i in range(n_tasks)), rank=2, scaling=1.5,
                          top_k=top_k, seed=3, index=0)
    with torch.no_grad():
        for b in layer.experts():
            b.normal_()
        assert layer.gate is not None
        layer.gate.normal_()
    return layer


# ---- the gate ------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [2, 3])
def test_gate_keeps_top_k_per_token_and_renormalises(top_k: int) -> None:
    layer = _layer(n_tasks=4, top_k=top_k)
    x = torch.randn(3, 7, 6)
    mask, w = layer.routing(x)
    z = x @ layer.gate.detach().T
    assert torch.equal(mask.sum(-1), torch.full((3, 7), float(top_k)))
    kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
    assert torch.equal(mask.bool(), z >= kth)  # exactly the k largest logits
    assert torch.all(w[mask == 0] == 0) and torch.all(w[mask == 1] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 7))
    want = torch.softmax(z.masked_fill(mask == 0, float("-inf")), -1)
    torch.testing.assert_close(w, want)
    # the mixture output is the weighted sum of the experts' outputs, token by token
    layer.train_mode = layer.eval_mode = "mix"
    out = layer(x) - layer.base(x)
    per_expert = []
    for j, b in enumerate(layer.experts()):
        a = layer.lora_A[j * 2:(j + 1) * 2]
        per_expert.append(1.5 * (x @ a.T) @ b.detach().T)
    torch.testing.assert_close(out, sum(w[..., j, None] * per_expert[j] for j in range(4)), rtol=1e-5, atol=1e-6)


def test_expert_mode_uses_only_the_active_task() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 6)
    layer.active = "t1"
    want = layer.base(x) + 1.5 * (x @ layer.lora_A[2:4].T) @ layer.experts()[1].detach().T
    torch.testing.assert_close(layer(x), want)


# ---- Opacus per-sample gradients ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mix", "expert"])
def test_grad_sampler_matches_per_example_autograd(mode: str) -> None:
    from opacus import GradSampleModule

    layer = _layer(n_tasks=3, top_k=2)
    layer.train_mode, layer.active = mode, "t2"
    x, target = torch.randn(5, 7, 6), torch.randn(5, 7, 5)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - t) ** 2 * torch.linspace(0.5, 1.5, 5)).sum() + out.sin().sum()

    params = [*layer.experts(), layer.gate]
    expected: list[list[torch.Tensor]] = [[] for _ in params]
    for i in range(len(x)):
        layer.zero_grad()
        loss_fn(layer(x[i:i + 1]), target[i:i + 1]).backward()
        for j, p in enumerate(params):
            expected[j].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    gsm.zero_grad()
    loss_fn(gsm(x), target).backward()
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad_sample, torch.stack(want), rtol=1e-4, atol=1e-5)
    if mode == "mix":
        assert layer.gate.grad_sample.abs().sum() > 0 and all(b.grad_sample.abs().sum() > 0 for b in layer.experts())
    else:
        assert layer.experts()[2].grad_sample.abs().sum() > 0 and layer.gate.grad_sample.abs().sum() == 0
    gsm._close()


# ---- phases, replies and aggregation -------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> ServerSetup:
    return ServerSetup(_cfg(tiny_model_dir, **{"adapter.options": {"expert_rounds": 2}}))


def test_reply_specs_per_phase(server: ServerSetup) -> None:
    specs = server.spec.task_specs
    assert set(specs) == {"rt", "bbc", "tweets", "rt@gate", "bbc@gate", "tweets@gate"}
    for task in ("rt", "bbc", "tweets"):
        experts, gates = set(specs[task].tensors), set(specs[task + "@gate"].tensors)
        assert {owned_task(k) for k in experts} == {task}  # own expert B of every layer + own head
        assert not any(k.endswith(".gate") for k in experts)
        assert {k for k in gates if owned_task(k) is None} == {k for k in gates if k.endswith(".gate")}
        assert {owned_task(k) for k in gates} == {None, task} and all("classifier" in k for k in gates if owned_task(k))
    assert not any("lora_A" in k or k == SCHEDULE_KEY for s in specs.values() for k in s.tensors)
    np.testing.assert_array_equal(server.state[SCHEDULE_KEY], [0.0, 2.0])  # sent down only


def test_client_phase_follows_the_schedule(tiny_model_dir: Path, server: ServerSetup) -> None:
    rt = Runtime(server.cfg)
    model, ident = rt.model, ClientIdentity("1", 1, "", Path("ledger"))
    plugin = rt.plugin
    for done, phase in [(0, "expert"), (1, "expert"), (2, "mix"), (3, "mix")]:
        rt.activate(model, ident)
        plugin.load_state(model, {**server.state, SCHEDULE_KEY: np.asarray([done, 2], dtype=np.float32)})
        sent = set(plugin.trainable_state(model))
        want = server.spec.task_specs["bbc" if phase == "expert" else "bbc@gate"].tensors
        assert sent == set(want), (done, phase)
        layer = meteora_layers(model)[0][1]
        assert layer.train_mode == phase and layer.eval_mode == ("expert" if done <= 2 else "mix")
    activate_task(model, None)


def _random_state(spec_tensors: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=shape).astype(dtype) for k, (shape, dtype) in dict(spec_tensors).items()}


def _delta(layer: MeteoRALinear, j: int) -> torch.Tensor:
    r = layer.rank
    return (layer.scaling * layer.experts()[j] @ layer.lora_A[j * r:(j + 1) * r]).detach().double()


def test_expert_phase_averages_each_expert_within_its_task_exactly(tiny_model_dir: Path) -> None:
    setup = ServerSetup(_cfg(tiny_model_dir, **{"tasks.clients_per_task": 2, "train.clients": 6}))
    rng = np.random.default_rng(0)
    tasks, weights = ["rt", "rt", "bbc", "bbc", "tweets", "tweets"], [1.0, 3.0, 2.0, 2.0, 5.0, 1.0]
    states = [_random_state(setup.spec.task_specs[t].tensors, rng) for t in tasks]
    deltas = []
    for task, state in zip(tasks, states, strict=True):
        setup.plugin.load_state(setup.model, {**setup.state, **state})
        deltas.append({n: _delta(layer, layer.names.index(task)) for n, layer in meteora_layers(setup.model)})
    # a client that also sends a gate in the expert phase: the gate is ignored
    rogue = dict(states[0])
    rogue.update({k: np.full(v.shape, 9.0, v.dtype) for k, v in setup.state.items() if k.endswith(".gate")})
    new = setup.plugin.aggregate_multitask([rogue, *states[1:]], weights, {}, setup.state)
    for key in setup.state:
        if key.endswith(".gate") or key == SCHEDULE_KEY:
            np.testing.assert_array_equal(new[key], setup.state[key])
    setup.set_state(new)
    for t, task in enumerate(("rt", "bbc", "tweets")):
        idx = [2 * t, 2 * t + 1]
        w = np.asarray([weights[i] for i in idx]) / sum(weights[i] for i in idx)
        for name, layer in meteora_layers(setup.model):
            want = sum(wi * deltas[i][name] for wi, i in zip(w, idx, strict=True))
            torch.testing.assert_close(_delta(layer, layer.names.index(task)), want, rtol=1e-5, atol=1e-6)


def test_gate_phase_averages_gates_over_all_clients(tiny_model_dir: Path) -> None:
    setup = ServerSetup(_cfg(tiny_model_dir, **{"adapter.options": {"expert_rounds": 1}}))
    setup.set_state({**setup.state, SCHEDULE_KEY: np.asarray([1, 1], dtype=np.float32)})  # gate phase next
    rng = np.random.default_rng(1)
    tasks, weights = ["rt", "bbc", "tweets"], [1.0, 2.0, 5.0]
    states = [_random_state(setup.spec.task_specs[t + "@gate"].tensors, rng) for t in tasks]
    experts = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in setup.state.items()
               if owned_task(k) == "rt" and "classifier" not in k}
    states[0] = {**states[0], **experts}  # expert tensors in the gate phase are ignored
    new = setup.plugin.aggregate_multitask(states, weights, {}, setup.state)
    w = np.asarray(weights) / sum(weights)
    for key in new:
        if key.endswith(".gate"):
            want = sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states, strict=True))
            np.testing.assert_allclose(new[key], want, rtol=1e-5, atol=1e-6)
        elif key in experts:
            np.testing.assert_array_equal(new[key], setup.state[key])
        elif "classifier.task_" in key:
            owner = owned_task(key)
            np.testing.assert_array_equal(new[key], states[tasks.index(str(owner))][key])
    stepped = setup.plugin.server_step(2, new, setup.cfg)
    np.testing.assert_array_equal(stepped[SCHEDULE_KEY], [2.0, 1.0])


def test_gate_training_lowers_the_loss_with_experts_frozen(tiny_model_dir: Path) -> None:
    """Gate phase on one client's batch: 15 plain steps of the gates alone (experts set,
    head frozen) lower the loss -- the gate learns to pick experts."""
    from fedpeft.client.trainer import train_local
    from fedpeft.tasks.seq_cls import evaluate

    cfg = _cfg(tiny_model_dir, **{"adapter.options": {"expert_rounds": 1}, "train.lr": 0.05})
    rt = Runtime(cfg)
    model, ident = rt.model, ClientIdentity("0", 0, "", Path("ledger"))
    rng = np.random.default_rng(2)
    rt.activate(model, ident)
    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters()
             if n in model._fedpeft_trainable}
    state.update({k: rng.normal(scale=0.5, size=v.shape).astype(v.dtype) for k, v in state.items()
                  if "classifier" not in k and not k.endswith(".gate")})
    state[SCHEDULE_KEY] = np.asarray([2, 1], dtype=np.float32)  # a later gate round: train and evaluate the mixture
    rt.plugin.load_state(model, state)
    for name, p in model.named_parameters():
        if "classifier" in name:
            p.requires_grad_(False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".gate") for n in trainable)
    data = rt.data_for(ident, {}).subset(np.arange(16))
    assert meteora_layers(model)[0][1].mode == "mix"  # evaluation and training use the mixture
    assert_learns_beyond_random(
        {n: p for n, p in model.named_parameters() if p.requires_grad},
        lambda: train_local(model, rt.plugin, rt.tokenizer, data, cfg, steps=15, device=torch.device("cpu"),
                            noise_multiplier=None, seed=0),
        lambda: float(evaluate(model, rt.tokenizer, data, 24, torch.device("cpu"))["loss"]), label="meteora gate")
    activate_task(model, None)


# ---- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "needle"), [
    ({"top_k": 1}, "adapter.options.top_k=1"),
    ({"top_k": 4}, "adapter.options.top_k=4"),
    ({"expert_rounds": 5}, "adapter.options.expert_rounds=5"),
    ({"expert_rounds": 0}, "must be an integer in [1, 4]"),
    ({"gate": 2}, "unknown option for meteora; allowed: expert_rounds, top_k"),
])
def test_bad_options_are_one_line(tiny_model_dir: Path, options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tiny_model_dir, **{"adapter.options": options})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--tasks", TASKS, "--method", "meteora", "--set", "adapter.options.top_k=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_k" in err[0] and "[2, 3]" in err[0]


def test_single_task_run_is_ffa_lora_with_one_expert(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """Without [tasks]: one expert per layer, no gate; the adapter alone (head frozen) lowers
    the training loss on a fixed batch."""
    import dataclasses

    from fedpeft.adapters import get
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.tasks.seq_cls import load_base_model

    train = dataclasses.replace(tiny_cfg.train, batch_size=32, physical_batch_size=32, lr=3e-2)
    cfg = dataclasses.replace(tiny_cfg, train=train, adapter=dataclasses.replace(tiny_cfg.adapter, method="meteora"))
    plugin = get("meteora")
    model = plugin.attach(load_base_model(cfg.model, 2, head_seed=cfg.adapter.seed), cfg)
    state = plugin.trainable_state(model)
    assert all(k.endswith(".lora_B") or k.startswith("classifier") for k in state)
    assert all(layer.gate is None for _, layer in meteora_layers(model))
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = pool.subset(np.arange(32))
    adapter_alone_lowers_loss(model, plugin, cfg, data)  # asserts: by more than a random update of its size


# ---- one real Flower simulation -----------------------------------------------------------------
@pytest.mark.slow  # a real Ray simulation, ~2 min on 2 cores: CI runs it in its slow step
def test_meteora_simulation_two_phases_dp(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 64,
        "data.test_size": 30, "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
        "tasks.names": TASKS, "tasks.public_size": 16, "adapter.method": "meteora",
        "adapter.options": {"expert_rounds": 1},
    })
    path, _ = simulate(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    spec = ServerSetup(cfg).spec.task_specs
    assert [r["meteora_phase"] for r in rows] == ["experts", "gate"]
    assert rows[0]["bytes_up"] == sum(spec[t].nbytes for t in ("rt", "bbc", "tweets"))
    assert rows[1]["bytes_up"] == sum(spec[t + "@gate"].nbytes for t in ("rt", "bbc", "tweets"))
    for row in rows:
        assert row["clients_per_task"] == {"rt": 1, "bbc": 1, "tweets": 1}
        assert set(row["accuracy_per_task"]) == {"rt", "bbc", "tweets"}
        assert 0 < row["epsilon"] <= cfg.privacy.epsilon
    shares = rows[1]["meteora_routing_own_expert"]
    assert set(shares) == {"rt", "bbc", "tweets"} and all(0.0 <= v <= 1.0 for v in shares.values())
    final = np.load(path / "adapter" / "adapter_state.npz")
    np.testing.assert_array_equal(final[SCHEDULE_KEY], [2.0, 1.0])
    assert any(k.endswith(".gate") for k in final.files)
