"""ICM-LoRA (src/fedpeft/adapters/icm_lora/: plugin, layers, server, cvae) and the task-vector release
(src/fedpeft/privacy/releases.py, src/fedpeft/client/task_release.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tiny_model import adapter_alone_lowers_loss

from fedpeft.adapters.icm_lora.cvae import ConditionalVAE, CVAEConfig
from fedpeft.adapters.icm_lora.layers import TV_MODULE, icm_layers
from fedpeft.adapters.icm_lora.server import IcmServer, prototype_accuracy
from fedpeft.cli.main import main as cli_main
from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.layout import activate_task, owned_task
from fedpeft.load import parse_config
from fedpeft.privacy.accounting import calibrate_noise, epsilon_for
from fedpeft.privacy.ledger import Ledger
from fedpeft.privacy.releases import calibrate_after, clipped_noisy_mean, record_release, release_entry
from fedpeft.server.setup import ServerSetup
from fedpeft.strategies.multitask_avg import grouped_aggregate

TASKS = "rt,bbc"


def _cfg(tiny_model_dir: Path, **extra: Any) -> RunConfig:
    layer = {
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 48,
        "data.test_size": 30, "train.batch_size": 16, "train.local_steps": 2, "train.rounds": 2,
        "tasks.names": TASKS, "train.clients": 2, "tasks.public_size": 16, "adapter.method": "icm_lora",
    }
    layer.update(extra)
    return parse_config(layer)


# ---- the CVAE ----------------------------------------------------------------------------------
def test_cvae_learns_a_linear_map_better_than_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 120, generator=gen) / 8 ** 0.5
    c = torch.randn(72, 8, generator=gen) + 2.0
    y = c @ w + 0.05 * torch.randn(72, 120, generator=gen) + 1.0
    cvae = ConditionalVAE(8, 120, CVAEConfig(steps=400, seed=0))
    cvae.fit(c[:48], y[:48])
    mse = float(((cvae.generate(c[48:]) - y[48:]) ** 2).mean())
    mean_mse = float(((y[:48].mean(0) - y[48:]) ** 2).mean())
    assert mse < 0.3 * mean_mse, (mse, mean_mse)
    first, again = (ConditionalVAE(8, 120, CVAEConfig(steps=20, seed=0)) for _ in range(2))
    first.fit(c[:48], y[:48])
    again.fit(c[:48], y[:48])
    torch.testing.assert_close(again.generate(c[48:]), first.generate(c[48:]))  # seeded: deterministic
    assert cvae.generate(c[50]).shape == (120,)


def test_prototype_accuracy() -> None:
    x = torch.tensor([[1.0, 0.1], [0.9, -0.1], [0.0, 1.0], [0.1, 0.8]])
    y = np.array([0, 0, 1, 1])
    assert prototype_accuracy(x, y, torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]), np.array([0, 1, 1])) == \
        pytest.approx(2 / 3)


# ---- the task-vector release ------------------------------------------------------------------------
def test_clipped_noisy_mean_clips_and_adds_the_stated_noise() -> None:
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])
    clean = clipped_noisy_mean(v, clip=1.0, sigma=0.0)
    torch.testing.assert_close(clean, torch.tensor([(0.6 + 0.3) / 3, (0.8 + 0.4 - 1.0) / 3]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([clipped_noisy_mean(v, 1.0, 2.0, gen) for _ in range(4000)])
    std = float((draws - clean).std())
    assert std == pytest.approx(2.0 * 1.0 / 3, rel=0.05)  # sigma * clip / n
    a, b = clipped_noisy_mean(v, 1.0, 2.0), clipped_noisy_mean(v, 1.0, 2.0)
    assert not torch.equal(a, b)  # secret seed: never reproducible by the server


def test_release_epsilon_matches_the_analytic_gaussian_mechanism() -> None:
    """One release (sigma, q=1, 1 step) through the run's accountant vs the exact privacy
    curve of the Gaussian mechanism (Balle & Wang 2018) with the replace-one sensitivity 2
    of a clipped sum (C = 1): the accountant may only be a little looser, never tighter."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from fedpeft.privacy.releases import release_epsilon

    for sigma in (2.0, 5.0):
        def excess(eps: float, s: float = sigma) -> float:
            return float(norm.cdf(-eps * s / 2 + 1 / s) - math.exp(eps) * norm.cdf(-eps * s / 2 - 1 / s) - 1e-5)

        exact = brentq(excess, 1e-4, 20.0)
        got, accountant = release_epsilon(sigma, 1e-5)
        assert accountant == "pld" and exact <= got <= 1.03 * exact, (sigma, got, exact)


def test_calibration_after_a_release_fits_the_budget() -> None:
    q, steps, delta = 0.25, 12, 1e-5
    plain = calibrate_noise(6.0, delta, q, steps, "pld")
    over, _ = epsilon_for([release_entry(3.0), (plain.noise_multiplier, q, steps)], delta, "pld")
    assert over > 6.0  # the release on top of the plain plan would break the budget
    plan = calibrate_after([release_entry(3.0)], 6.0, delta, q, steps, "pld")
    total, _ = epsilon_for([release_entry(3.0), (plan.noise_multiplier, q, steps)], delta, "pld")
    assert plan.noise_multiplier > plain.noise_multiplier and 5.8 < total <= 6.0
    with pytest.raises(ValueError, match="releases alone"):
        calibrate_after([release_entry(0.2)], 1.0, delta, q, steps, "pld")


def test_release_reaches_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "client-7.json"
    ledger = record_release(path, "7", target_epsilon=6.0, delta=1e-5, accountant="pld", sigma=4.0, sample_rate=0.25,
                            planned_steps=12, tag="task-vector", payload=np.ones(3, np.float32))
    loaded = Ledger.load_or_new(path, None, client="7", target_epsilon=6.0, delta=1e-5, accountant="pld")
    assert loaded.history == [(4.0, 1.0, 1)] and loaded.noise_multiplier == ledger.noise_multiplier > 0
    alone, _ = epsilon_for([(4.0, 1.0, 1)], 1e-5, "pld")
    assert loaded.epsilon()[0] == pytest.approx(alone) and alone > 0.5
    # the whole planned run (release + every DP-SGD step) fits the target: the last round is not refused
    assert loaded.check_budget(12) <= 6.0


def test_client_releases_once_and_its_ledger_composes_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedpeft.client.trainer import local_steps

    cfg = _cfg(tiny_model_dir)
    rt = Runtime(cfg)
    ident = ClientIdentity("1", 1, "", tmp_path)
    data = rt.data_for(ident, {})
    model = rt.model
    rt.activate(model, ident)
    holder = getattr(model, TV_MODULE)
    released = holder.task_bbc.detach().clone()
    assert released.abs().sum() > 0 and holder.task_rt.abs().sum() == 0
    ledger = Ledger.from_json((tmp_path / "client-1.json").read_text())
    assert ledger.history == [(5.0, 1.0, 1)]  # default tv_noise = 5: one Gaussian release, q = 1
    steps = local_steps(cfg, len(data)) * cfg.train.rounds
    assert ledger.planned_steps == steps and ledger.epsilon_if(steps)[0] <= cfg.privacy.epsilon
    # the client's own vector survives loading the global state, and it is sent with its head
    state = {k: np.zeros_like(v.numpy()) for k, v in rt.plugin.trainable_state(model).items()}
    rt.plugin.load_state(model, {**ServerSetup(cfg).state, **state})
    torch.testing.assert_close(holder.task_bbc.detach(), released)
    sent = rt.plugin.trainable_state(model)
    assert f"{TV_MODULE}.task_bbc" in sent and f"{TV_MODULE}.task_rt" not in sent
    assert {owned_task(k) for k in sent} == {"bbc"}
    # the next round reuses the stored vector: no new release, no new ledger entry
    rt.activate(model, ident)
    torch.testing.assert_close(holder.task_bbc.detach(), released)
    assert len(Ledger.from_json((tmp_path / "client-1.json").read_text()).entries) == 1
    # the vector is a noisy mean of unit vectors: its norm is near the clean mean's, not 0
    clean = rt.plugin.release_vectors(model, rt.tokenizer, data, cfg).mean(0)
    noise = float((released - clean).norm())
    expected = 5.0 * math.sqrt(clean.numel()) / len(data)
    assert 0.5 * expected < noise < 1.5 * expected
    activate_task(model, None)


# ---- aggregation -------------------------------------------------------------------------------------
def test_b_head_and_task_vector_average_within_the_task_exactly(tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, **{"tasks.clients_per_task": 2, "train.clients": 4})
    setup = ServerSetup(cfg)
    spec = setup.spec.task_specs
    assert set(spec) == {"rt", "bbc"} and not (set(spec["rt"].tensors) & set(spec["bbc"].tensors))
    rng = np.random.default_rng(0)
    tasks, weights = ["rt", "rt", "bbc", "bbc"], [1.0, 3.0, 2.0, 6.0]
    states = [{k: rng.normal(size=s).astype(d) for k, (s, d) in spec[t].tensors.items()} for t in tasks]
    deltas = []
    for task, state in zip(tasks, states, strict=True):
        setup.plugin.load_state(setup.model, {**setup.state, **state})
        deltas.append({n: (layer.scaling * layer.up(task).weight @ layer.down.weight).detach().double()
                       for n, layer in icm_layers(setup.model)})
    new = grouped_aggregate(setup.plugin, states, weights, {}, setup.state)
    setup.set_state(new)
    for t, task in enumerate(("rt", "bbc")):
        w = np.asarray(weights[2 * t:2 * t + 2]) / sum(weights[2 * t:2 * t + 2])
        for name, layer in icm_layers(setup.model):
            got = (layer.scaling * layer.up(task).weight @ layer.down.weight).detach().double()
            want = w[0] * deltas[2 * t][name] + w[1] * deltas[2 * t + 1][name]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        key = f"{TV_MODULE}.task_{task}"
        np.testing.assert_allclose(new[key], w[0] * states[2 * t][key] + w[1] * states[2 * t + 1][key], rtol=1e-5)


# ---- the server: pairs, generation, held-out evaluation -----------------------------------------
def test_server_learns_pairs_and_evaluates_the_heldout_task(tiny_model_dir: Path) -> None:
    cfg = _cfg(tiny_model_dir, **{"adapter.options": {"heldout_task": "tweets", "cvae_steps": 50,
                                                      "snapshot_window": 2}})
    setup = ServerSetup(cfg)
    rng = np.random.default_rng(3)
    server = IcmServer(setup, setup.plugin.settings(cfg))
    assert server.test is not None and server.test.num_classes == 3 and server.heldout_tv is not None

    def report(r: int) -> SimpleNamespace:
        replies = []
        for task in ("rt", "bbc"):
            state = {k: rng.normal(scale=0.1, size=s).astype(d) for k, (s, d) in setup.spec.task_specs[task].tensors.items()}
            replies.append(SimpleNamespace(state=state))
        return SimpleNamespace(accepted=replies, released=True)

    rows = [server.round_end(r, report(r)) for r in (1, 2, 3)]
    assert [row["icm_pairs"] for row in rows] == [2, 4, 4]  # snapshot_window = 2 rounds
    last = rows[-1]
    for key in ("icm_heldout_accuracy_generated", "icm_heldout_accuracy_unadapted",
                "icm_heldout_accuracy_nearest_adapter"):
        assert 0.0 <= last[key] <= 1.0
    assert last["icm_heldout_nearest_task"] in ("rt", "bbc") and math.isfinite(last["icm_cvae_loss"])
    generated = setup.model._icm_generated
    assert len(generated) == len(icm_layers(setup.model)) and all(v.abs().sum() > 0 for v in generated.values())
    assert all(layer.override is None for _, layer in icm_layers(setup.model))  # restored after evaluation


# ---- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [
    ({"adapter.options": {"heldout_task": "rt"}}, "is trained by the run's clients; allowed: none, tweets"),
    ({"adapter.options": {"heldout_task": "imdb"}}, "is not a shipped task"),
    ({"adapter.options": {"tv_noise": 0}}, "adapter.options.tv_noise=0"),
    ({"adapter.options": {"snapshot_window": 0}}, "adapter.options.snapshot_window=0"),
    ({"adapter.options": {"heldout_task": "tweets"}, "tasks.public_size": 4}, "tasks.public_size=4"),
    ({"adapter.options": {"noise": 1}}, "unknown option for icm_lora"),
])
def test_bad_options_are_one_line(tiny_model_dir: Path, extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(tiny_model_dir, **extra)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_heldout_without_tasks_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--method", "icm_lora", "--set", "adapter.options.heldout_task=bbc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heldout_task" in err[0] and "multi-task" in err[0]


# ---- one real Flower simulation -----------------------------------------------------------------
@pytest.mark.slow  # a real Ray simulation, ~2 min on 2 cores: CI runs it in its slow step
def test_icm_lora_simulation_dp_with_heldout_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedpeft.sim.simulate import simulate

    cfg = parse_config({
        "model.path": str(tiny_model_dir), "model.max_length": 24, "data.examples_per_client": 64,
        "data.test_size": 30, "train.rounds": 2, "train.batch_size": 32, "train.local_steps": 2,
        "tasks.names": TASKS, "train.clients": 2, "tasks.public_size": 16, "adapter.method": "icm_lora",
        "adapter.options": {"heldout_task": "tweets", "cvae_steps": 100},
    })
    path, _ = simulate(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    spec = ServerSetup(cfg).spec
    for row in rows:
        assert row["clients_per_task"] == {"rt": 1, "bbc": 1} and row["clients_accepted"] == 2
        assert row["bytes_up"] == sum(s.nbytes for s in spec.task_specs.values())
        assert 0.0 <= row["icm_heldout_accuracy_generated"] <= 1.0
        assert 0.0 <= row["icm_heldout_accuracy_unadapted"] <= 1.0
        assert 0 < row["epsilon"] <= cfg.privacy.epsilon
    assert rows[-1]["icm_pairs"] == 4
    # each client's ledger holds the task-vector release (q = 1) next to its DP-SGD rounds
    for cid in ("0", "1"):
        ledger = Ledger.from_json((path / "ledger" / f"client-{cid}.json").read_text())
        assert ledger.history[0] == (5.0, 1.0, 1) and [e.round for e in ledger.entries] == [0, 1, 2]
        assert rows[-1]["epsilon_per_client"][cid] == pytest.approx(ledger.epsilon()[0])
        assert (path / "ledger" / f"client-{cid}.release-task-vector.npy").is_file()
    final = np.load(path / "adapter" / "adapter_state.npz")
    assert any(k.startswith("heldout.") for k in final.files)


def test_single_task_run_is_ffa_lora_and_learns(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """Without [tasks]: one shared B per layer, no task vector; the adapter alone (head frozen)
    lowers the training loss on a fixed batch."""
    import dataclasses

    from fedpeft.adapters import get
    from fedpeft.data.sources import train_test_split_for
    from fedpeft.tasks.seq_cls import load_base_model

    train = dataclasses.replace(tiny_cfg.train, batch_size=32, physical_batch_size=32, lr=3e-2)
    cfg = dataclasses.replace(tiny_cfg, train=train, adapter=dataclasses.replace(tiny_cfg.adapter, method="icm_lora"))
    plugin = get("icm_lora")
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = pool.subset(np.arange(32))
    model = plugin.attach(load_base_model(cfg.model, 2, head_seed=cfg.adapter.seed), cfg)
    assert not hasattr(model, TV_MODULE)
    assert all(k.endswith(".lora_up.weight") or k.startswith("classifier") for k in plugin.trainable_state(model))
    adapter_alone_lowers_loss(model, plugin, cfg, data)  # asserts: by more than a random update of its size


def test_server_learns_the_pairs_it_is_sent(tiny_model_dir: Path) -> None:
    """The README's claim, played as a check that can fail: the server's CVAE learns the
    (task vector -> B) map from the replies' pairs. Each task's replies carry that task's
    vector and B (plus per-client jitter); after one round of eight pairs B generated from a trained task's
    vector is close to that task's B (``icm_reconstruction_rel_error``) and nearer to it than
    to the other task's. Control: replies whose B belongs to the other task (pairs mislabelled)
    give a large error, so the metric measures the pairs, not the CVAE's prior."""
    cfg = _cfg(tiny_model_dir, **{"adapter.options": {"cvae_steps": 150}})
    setup = ServerSetup(cfg)
    spec = setup.spec.task_specs
    rng = np.random.default_rng(11)
    truth = {t: {k: rng.normal(scale=0.2, size=s).astype(d) for k, (s, d) in spec[t].tensors.items()}
             for t in ("rt", "bbc")}
    for t in truth:  # unit task vectors, as the clients' normalised mean embeddings are
        key = f"{TV_MODULE}.task_{t}"
        truth[t][key] = (truth[t][key] / np.linalg.norm(truth[t][key])).astype(np.float32)
    setup.set_state({**setup.state, **truth["rt"], **truth["bbc"]})

    def run(swap: bool) -> tuple[dict[str, Any], IcmServer]:
        server = IcmServer(setup, setup.plugin.settings(cfg))
        replies = []
        for task, other in (("rt", "bbc"), ("bbc", "rt")):
            for _ in range(4):
                state = {k: v + rng.normal(scale=0.01, size=v.shape).astype(v.dtype) for k, v in truth[task].items()}
                if swap:  # the other task's B under this task's names
                    for k in state:
                        if not k.startswith(TV_MODULE):
                            state[k] = truth[other][k.replace(f"task_{task}", f"task_{other}")].copy()
                replies.append(SimpleNamespace(state=state))
        return server.round_end(1, SimpleNamespace(accepted=replies, released=True)), server

    row, server = run(swap=False)
    assert row["icm_pairs"] == 8 and row["icm_reconstruction_rel_error"] < 0.35, row
    cvae = server.fit()
    for task, other in (("rt", "bbc"), ("bbc", "rt")):
        gen = cvae.generate(torch.as_tensor(truth[task][f"{TV_MODULE}.task_{task}"])).numpy()
        own, far = server.flat_b(truth[task], task), server.flat_b(truth[other], other)
        assert np.linalg.norm(gen - own) < 0.5 * np.linalg.norm(gen - far), task
    control, _ = run(swap=True)
    assert control["icm_reconstruction_rel_error"] > 1.0, control
