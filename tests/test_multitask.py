"""Multi-task federations (src/fedpeft/data/layout.py, src/fedpeft/strategies/multitask_avg.py,
src/fedpeft/server/multitask.py and the per-task part of the client runtime) and the MTLoRA / SMoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_model import adapter_alone_lowers_loss, dp_rng
from torch import nn

from fedpeft.adapters.mtlora import delta_weights
from fedpeft.adapters.smora import SMoRALinear, smora_layers
from fedpeft.cli.main import main as cli_main
from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import ConfigError, RunConfig, config_to_toml
from fedpeft.config.tasks import TaskSpec
from fedpeft.data.layout import activate_task, load_task, owned_task, task_layout
from fedpeft.load import config_from_toml, parse_config
from fedpeft.server.setup import ServerSetup
from fedpeft.strategies.multitask_avg import grouped_aggregate
from fedpeft.strategies.validation import Rejected

TASKS = "rt,bbc,tweets"


def _cfg(tiny_model_dir: Path, method: str, **extra: Any) -> RunConfig:
    return parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 48,
        "data.test_size": 30, "train.batch_size": 16, "train.local_steps": 2, "tasks.names": TASKS,
        "tasks.public_size": 16, "adapter.method": method, **extra,
    })


# ---- data and configuration ------------------------------------------------------------
@pytest.mark.parametrize(("name", "classes"), [("rt", 2), ("bbc", 5), ("tweets", 3)])
def test_shipped_tasks_load(name: str, classes: int) -> None:
    data = load_task(TaskSpec(name))
    assert data.num_classes == classes
    assert len(data) > 2000
    assert set(np.unique(data.labels)) == set(range(classes))
    assert all(isinstance(t, str) and t.strip() for t in data.texts[:50])


def test_layout_splits_are_disjoint_and_per_task(tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, "mtlora", **{"tasks.clients_per_task": 2, "train.clients": 6})
    layout = task_layout(cfg)
    assert [t.name for t in layout] == ["rt", "bbc", "tweets"]
    assert [list(t.clients) for t in layout] == [[0, 1], [2, 3], [4, 5]]
    for task in layout:
        assert len(task.test) == 30 - 30 % len(task.label_names) and len(task.public) == 16
        test, public = set(task.test.texts), set(task.public.texts)
        a, b = (set(task.client_data(cfg, pid).texts) for pid in task.clients)
        assert not (a & b) and not (a & test) and not (a & public)


def test_user_task_table_round_trips_through_toml(tmp_path: Path, tiny_model_dir: Path) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text("body,stars\n" + "\n".join(f"text number {i},{'good' if i % 2 else 'bad'}" for i in range(120)))
    cfg = parse_config({"model.path": str(tiny_model_dir), "train.clients": 3, "data.test_size": 20,
                        "tasks": {"names": ["rt"], "mine": {"path": str(csv), "text_column": "body",
                                                            "label_column": "stars", "clients": 2}}})
    assert [(s.name, s.clients) for s in cfg.tasks.resolved()] == [("rt", 1), ("mine", 2)]
    assert config_from_toml(config_to_toml(cfg)) == cfg
    assert task_layout(cfg)[1].label_names == ("bad", "good")


@pytest.mark.parametrize(("layer", "needle"), [
    ({"tasks.names": "rt,nope"}, "tasks.names='nope'"),
    ({"tasks.names": "rt,bbc"}, "train.clients=3"),
    ({"tasks": {"names": "rt", "x": {"path": "/no/such.csv"}}, "train.clients": 2}, "tasks.x.path"),
    ({"tasks": {"names": "rt", "x": {"colour": "red"}}}, "tasks.x.colour"),
    ({"tasks.names": "rt,rt"}, "named twice"),
    ({"tasks.names": "rt,bbc,tweets", "adapter.method": "smora", "adapter.options": {"top_k": 99}}, "top_k"),
])
def test_bad_task_config_is_one_line(layer: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(layer)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_tasks_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--tasks", "rt,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0] and "shipped: rt, bbc, tweets" in err[0]


# ---- per-task tensors and aggregation ---------------------------------------------------
@pytest.fixture(scope="module")
def mtlora_setup(tiny_model_dir: Path) -> ServerSetup:
    return ServerSetup(_cfg(tiny_model_dir, "mtlora"))


def test_client_sends_shared_plus_own_task_only(mtlora_setup: ServerSetup) -> None:
    spec = mtlora_setup.spec
    shared = set.intersection(*(set(s.tensors) for s in spec.task_specs.values()))
    assert shared and all(owned_task(k) is None for k in shared)
    for task, task_spec in spec.task_specs.items():
        owned = set(task_spec.tensors) - shared
        assert owned and {owned_task(k) for k in owned} == {task}
        assert any(k.startswith("classifier.") for k in owned)
        assert any(".up.weight" in k and "classifier" not in k for k in owned)  # TS-LoRA in the last block
    assert set(spec.tensors) == set().union(*(set(s.tensors) for s in spec.task_specs.values()))
    mixed = dict.fromkeys(spec.task_specs["rt"].tensors) | dict.fromkeys(spec.task_specs["bbc"].tensors)
    with pytest.raises(Rejected):
        spec.task_of(mixed)


def _random_state(spec_tensors: dict[str, tuple[tuple[int, ...], str]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=shape).astype(dtype) for k, (shape, dtype) in spec_tensors.items()}


def test_heads_aggregate_only_within_task_group(mtlora_setup: ServerSetup) -> None:
    spec, plugin = mtlora_setup.spec, mtlora_setup.plugin
    rng = np.random.default_rng(0)
    tasks = ["rt", "rt", "bbc", "tweets"]
    states = [_random_state(dict(spec.task_specs[t].tensors), rng) for t in tasks]
    weights = [10.0, 30.0, 5.0, 7.0]
    current = {k: v.copy() for k, v in mtlora_setup.state.items()}
    out = grouped_aggregate(plugin, states, weights, {}, current)
    assert set(out) == set(current)
    for key in out:
        owner = owned_task(key)
        idx = [i for i, t in enumerate(tasks) if owner is None or t == owner]
        w = np.asarray([weights[i] for i in idx]) / sum(weights[i] for i in idx)
        want = sum(wi * states[i][key].astype(np.float64) for wi, i in zip(w, idx, strict=True))
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-6)
    # a task whose clients all failed keeps the global state that was sent
    out2 = grouped_aggregate(plugin, states[:3], weights[:3], {}, current)
    for key in spec.task_specs["tweets"].tensors:
        if owned_task(key) == "tweets":
            np.testing.assert_array_equal(out2[key], current[key])


def test_mtlora_aggregated_delta_w_is_weighted_mean(tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, "mtlora")
    server = ServerSetup(cfg)
    rng = np.random.default_rng(1)
    tasks, weights = ["bbc", "bbc", "rt"], [2.0, 6.0, 4.0]
    states = [_random_state(dict(server.spec.task_specs[t].tensors), rng) for t in tasks]
    deltas = []
    for task, state in zip(tasks, states, strict=True):
        server.plugin.load_state(server.model, {**server.state, **state})
        deltas.append((task, delta_weights(server.model, task), delta_weights(server.model)))
    new = grouped_aggregate(server.plugin, states, weights, {}, server.state)
    server.set_state(new)
    shared_after = delta_weights(server.model)
    bbc_after = delta_weights(server.model, "bbc")
    w_all = np.asarray(weights) / sum(weights)
    for layer in shared_after:  # task-agnostic part: mean over every client
        want = sum(w * d[2][layer].double() for w, d in zip(w_all, deltas, strict=True))
        torch.testing.assert_close(shared_after[layer].double(), want, rtol=1e-5, atol=1e-6)
    w_bbc = np.asarray(weights[:2]) / sum(weights[:2])
    for layer in bbc_after:  # task-specific part: mean within the bbc group only
        own = [d[1][layer].double() - d[2][layer].double() for d in deltas[:2]]
        want = sum(w * o for w, o in zip(w_bbc, own, strict=True))
        torch.testing.assert_close(bbc_after[layer].double() - shared_after[layer].double(), want, rtol=1e-5, atol=1e-6)


def test_mtlora_local_mode_keeps_task_modules_on_client(tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, "mtlora", **{"adapter.options": {"task_modules": "local"}})
    server = ServerSetup(cfg)
    assert not any(".task_" in k and ".up.weight" in k for k in server.state)
    rt = Runtime(cfg)
    model, ident = rt.model, ClientIdentity("1", 1, "", Path("ledger"))
    rt.activate(model, ident)
    local = rt.plugin.local_state(model)
    assert local and all(owned_task(k) == "bbc" for k in local)
    changed = {k: np.full_like(v, 0.5) for k, v in local.items()}
    rt.plugin.load_local_state(model, changed)
    assert all(float(p.detach()[0, 0]) == 0.5 for n, p in model.named_parameters() if n in changed)
    rt.plugin.load_local_state(model, {})  # a fresh client: task modules back to zero
    assert all(float(p.detach().abs().sum()) == 0.0 for n, p in model.named_parameters() if n in changed)


def test_smora_aggregation_is_weighted_mean_of_b_and_router(tiny_model_dir: Path) -> None:
    server = ServerSetup(_cfg(tiny_model_dir, "smora"))
    assert any(k.endswith(".route_bias") for k in server.state)
    assert not any(k.endswith(".route_bias") or k.endswith("lora_A") for s in server.spec.task_specs.values()
                   for k in s.tensors)  # bias travels down only, A never
    rng = np.random.default_rng(2)
    tasks, weights = ["rt", "bbc", "tweets"], [1.0, 2.0, 3.0]
    states = [_random_state(dict(server.spec.task_specs[t].tensors), rng) for t in tasks]
    bank = []  # the experts' stacked weight B @ A (before gating) per layer: linear in B
    for state in states:
        server.plugin.load_state(server.model, {**server.state, **state})
        bank.append({n: (layer.lora_B @ layer.lora_A).detach().double() for n, layer in smora_layers(server.model)})
    server.set_state(grouped_aggregate(server.plugin, states, weights, {}, server.state))
    w = np.asarray(weights) / sum(weights)
    for name, layer in smora_layers(server.model):
        torch.testing.assert_close((layer.lora_B @ layer.lora_A).detach().double(),
                                   sum(wi * b[name] for wi, b in zip(w, bank, strict=True)), rtol=1e-5, atol=1e-6)
        want_router = sum(wi * s[f"{name}.router"].astype(np.float64) for wi, s in zip(w, states, strict=True))
        np.testing.assert_allclose(layer.router.detach().numpy(), want_router, rtol=1e-5, atol=1e-6)


def test_smora_public_step_moves_bias_toward_balance(tiny_model_dir: Path) -> None:
    server = ServerSetup(_cfg(tiny_model_dir, "smora", **{"adapter.options": {"bias_rate": 0.05}}))
    before = {k: v.copy() for k, v in server.state.items() if k.endswith(".route_bias")}
    loads = server.plugin.public_step(server.model, (b for _, b in server.public_batches()), server.cfg)
    server.state = server._global_state()
    assert loads
    for name, load in loads.items():
        step = server.state[f"{name}.route_bias"] - before[f"{name}.route_bias"]
        mean = 1.0 / len(load)
        for li, si in zip(load, step, strict=True):
            assert (si > 0) == (li < mean) and abs(abs(si) - 0.05) < 1e-6 or (li == mean and si == 0)


# ---- SMoRA per-sample gradients -----------------------------------------------------------
def test_smora_grad_sampler_matches_per_example_autograd() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    layer = SMoRALinear(nn.Linear(6, 5), rank=4, top_k=2, scaling=2.0, seed=3, index=0)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B: the router gets a gradient too
        layer.route_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x, target = torch.randn(5, 7, 6), torch.randn(5, 7, 5)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - t) ** 2 * torch.linspace(0.5, 1.5, 5)).sum() + out.sin().sum()

    expected: dict[str, list[torch.Tensor]] = {"lora_B": [], "router": []}
    for i in range(len(x)):
        layer.zero_grad()
        loss_fn(layer(x[i : i + 1]), target[i : i + 1]).backward()
        expected["lora_B"].append(layer.lora_B.grad.clone())
        expected["router"].append(layer.router.grad.clone())
    gsm = GradSampleModule(layer, loss_reduction="sum")  # the loss below is a sum over examples
    gsm.zero_grad()
    loss_fn(gsm(x), target).backward()
    torch.testing.assert_close(layer.lora_B.grad_sample, torch.stack(expected["lora_B"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.router.grad_sample, torch.stack(expected["router"]), rtol=1e-4, atol=1e-5)
    assert layer.router.grad_sample.abs().sum() > 0
    gsm._close()


def test_client_trains_only_shared_and_own_task_with_dp(tiny_model_dir: Path) -> None:
    from fedpeft.client.trainer import train_local

    cfg = _cfg(tiny_model_dir, "smora")
    server = ServerSetup(cfg)
    rt = Runtime(cfg)
    ident = ClientIdentity("2", 2, "", Path("ledger"))
    data = rt.data_for(ident, {})
    model = rt.model
    rt.activate(model, ident)
    rt.plugin.load_state(model, server.state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, rt.plugin, rt.tokenizer, data, cfg, 2, rt.device, 1.0, seed=dp_rng(0))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and {owned_task(n) for n in moved} <= {None, "tweets"}
    assert set(rt.plugin.trainable_state(model)) == set(server.spec.task_specs["tweets"].tensors)
    activate_task(model, None)


# ---- one real Flower simulation -----------------------------------------------------------
def _simulate(tiny_model_dir: Path, out: Path, method: str) -> tuple[RunConfig, list[dict[str, Any]]]:
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 64,
        "data.test_size": 30, "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
        "tasks.names": TASKS, "tasks.public_size": 16, "adapter.method": method,
    })
    path, rows = simulate(cfg, out)
    return cfg, [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _check_rows(cfg: RunConfig, rows: list[dict[str, Any]]) -> None:
    server = ServerSetup(cfg)
    expected_up = sum(s.nbytes for s in server.spec.task_specs.values())  # one client per task
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row["accuracy_per_task"]) == {"rt", "bbc", "tweets"}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy_per_task"].values())
        assert row["accuracy"] == pytest.approx(np.mean(list(row["accuracy_per_task"].values())))
        assert row["clients_per_task"] == {"rt": 1, "bbc": 1, "tweets": 1}
        assert row["bytes_up"] == expected_up
        assert row["bytes_down"] == 3 * server.spec.nbytes
        assert 0 < row["epsilon"] <= cfg.privacy.epsilon and row["accountant"] == "pld"
    assert rows[1]["epsilon"] > rows[0]["epsilon"]


@pytest.mark.slow  # a real Ray simulation, ~2 min on 2 cores: CI runs it in its slow step
def test_multitask_simulation_mtlora_dp(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg, rows = _simulate(tiny_model_dir, tmp_path / "run", "mtlora")
    _check_rows(cfg, rows)


@pytest.mark.slow
def test_multitask_simulation_smora_dp(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg, rows = _simulate(tiny_model_dir, tmp_path / "run", "smora")
    _check_rows(cfg, rows)
    assert (tmp_path / "run" / "adapter" / "adapter_state.npz").is_file()


@pytest.mark.parametrize("method", ["mtlora", "smora"])
def test_adapter_alone_lowers_the_loss_single_task(tiny_cfg, method: str) -> None:  # type: ignore[no-untyped-def]
    """Without [tasks] both methods are ordinary single-task adapters; with the head frozen,
    10 plain steps of the adapter alone lower the training loss on one fixed batch."""
    import dataclasses

    from fedpeft.adapters import get
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.tasks.seq_cls import load_base_model

    train = dataclasses.replace(tiny_cfg.train, batch_size=32, physical_batch_size=32, lr=3e-2)
    cfg = dataclasses.replace(tiny_cfg, train=train, adapter=dataclasses.replace(tiny_cfg.adapter, method=method))
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = pool.subset(np.arange(32))
    plugin = get(method)
    model = plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=cfg.adapter.seed), cfg)
    adapter_alone_lowers_loss(model, plugin, cfg, data)  # asserts: by more than a random update of its size
