"""TriAdaptLoRA, ABMLL and TexForce plugins: freezing, what travels, exact averaging,
server-decided rank growth, client-local state across handle_train calls, DP training."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from lora_helpers import assert_mean_dw
from tiny_model import attach_method as _model
from tiny_model import dp_rng
from tiny_model import to_numpy as _numpy
from tiny_model import with_method as _cfg
from torch import nn

from fedpeft.adapters.abmll import LOCAL_NAMES, BayesLoraLinear
from fedpeft.adapters.triadapt_lora import CORE, MASK, TriAdaptLinear
from fedpeft.config import ConfigError, config_hash, config_to_toml
from fedpeft.data.partition import client_partition
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.strategies.adapter_avg import state_to_arrayrecord
from fedpeft.strategies.validation import Rejected, StateSpec, validate_reply
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import task_for

METHODS = ("triadapt_lora", "abmll", "texforce")


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import Linear as LoraLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (TriAdaptLinear, BayesLoraLinear, LoraLinear))}


@torch.no_grad()
def _delta_w(model: nn.Module) -> dict[str, np.ndarray]:
    """Effective weight update of every adapted layer: layer(I) - base(I), eval mode."""
    model.eval()
    out = {}
    for name, layer in _adapted(model).items():
        base = layer.base_layer if hasattr(layer, "base_layer") else layer.base
        eye = torch.eye(base.in_features)
        out[name] = (layer(eye) - base(eye)).numpy().astype(np.float64)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_attach_freezes_and_states_what_travels(tiny_cfg, method: str) -> None:
    plugin, model = _model(_cfg(tiny_cfg, method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    for n in trainable - {n for n in trainable if "classifier" in n}:
        assert n.endswith({"triadapt_lora": ("core.weight",), "texforce": ("lora_B.default.weight",),
                           "abmll": ("prior_mean", "post_offset", "post_rho")}[method]), n
    frozen_adapter = [n for n, p in model.named_parameters() if not p.requires_grad
                      and any(s in n for s in ("down", "up.weight", "lora_A"))]
    assert frozen_adapter, "the seeded factors must exist and be frozen"
    state = plugin.trainable_state(model)
    assert all(not any(s in k for s in LOCAL_NAMES + ("lora_A", MASK, "down", "up.weight")) for k in state)
    assert plugin.frozen_fingerprint(model) == plugin.frozen_fingerprint(_model(_cfg(tiny_cfg, method))[1])


@pytest.mark.parametrize("method", METHODS)
def test_aggregation_is_exact(tiny_cfg, method: str) -> None:
    """Aggregated adapter update == weighted mean of the clients' updates (float precision)."""
    plugin, model = _model(_cfg(tiny_cfg, method))
    base = _numpy(plugin.trainable_state(model))
    rng = np.random.default_rng(0)
    states = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in base.items()} for _ in range(3)]
    if method == "triadapt_lora":  # replies hold masked cores (inactive entries zero)
        for s in states:
            plugin.load_state(model, s)
            s.update(_numpy(plugin.trainable_state(model)))
    weights = [1.0, 2.0, 5.0]
    deltas = []
    for s in states:
        plugin.load_state(model, s)
        deltas.append(_delta_w(model))
    agg = plugin.aggregate(states, weights, {})
    plugin.load_state(model, agg)
    assert_mean_dw(_delta_w(model), deltas, weights)


def test_triadapt_server_grows_ranks_shapes_fixed_new_blocks_zero(tiny_cfg) -> None:
    cfg = _cfg(tiny_cfg, "triadapt_lora", init_rank=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=5))
    plugin, client = _model(cfg)
    spec = StateSpec.from_state(_numpy(plugin.trainable_state(client)))
    rng = np.random.default_rng(1)
    reply = {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in spec_state(client, plugin).items()}
    plugin.load_state(client, reply)  # a client trains: only the 2x2 blocks may be non-zero
    reply = _numpy(plugin.trainable_state(client))
    cores = sorted(k for k in reply if k.endswith(CORE))
    # make one layer clearly the most important
    reply[cores[-1]][:2, :2] *= 50
    agg = plugin.server_step(1, plugin.aggregate([reply], [1.0], {}), cfg)
    ranks = {k: int(agg[k[: -len(CORE)] + MASK].sum()) for k in cores}
    n, r = len(cores), cfg.adapter.rank
    assert sum(ranks.values()) == n * 2 + (n * r - n * 2) // 4  # linear budget: a quarter after round 1 of 5
    assert ranks[cores[-1]] == max(ranks.values()) > min(ranks.values()) >= 2
    for k in cores:
        assert agg[k].shape == reply[k].shape
        grown = agg[k].copy()
        grown[:2, :2] = 0
        assert np.all(grown == 0), "new blocks must start at zero"
    # broadcast -> client: masks installed; the reply keeps the spec's shapes and never holds a mask
    plugin.load_state(client, agg)
    after = _numpy(plugin.trainable_state(client))
    assert StateSpec.from_state(after) == spec
    for k in cores:
        assert int(dict(client.named_buffers())[k[: -len(CORE)] + MASK].sum()) == ranks[k]
    content = RecordDict({"arrays": state_to_arrayrecord({**after, cores[0][: -len(CORE)] + MASK: agg[cores[0][: -len(CORE)] + MASK]}),
                          "metrics": MetricRecord({"num-examples": 10})})
    with pytest.raises(Rejected, match="unexpected"):
        validate_reply(content, spec)
    # the next round carries the masks over and grows to the full rank by the last round
    final = plugin.server_step(4, plugin.aggregate([after], [1.0], agg), cfg)
    assert all(int(final[k[: -len(CORE)] + MASK].sum()) == r for k in cores)


def spec_state(model, plugin):  # type: ignore[no-untyped-def]
    return _numpy(plugin.trainable_state(model))


def _train_msg(cfg, state, frozen: str, server_round: int, ledger_dir: Path) -> Message:  # type: ignore[no-untyped-def]
    conf = ConfigRecord({"server-round": server_round, "fedpeft-config": config_to_toml(cfg),
                         "config-hash": config_hash(cfg), "frozen-hash": frozen, "ledger-dir": str(ledger_dir)})
    meta = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({"arrays": state_to_arrayrecord(state), "config": conf}), metadata=meta)


@pytest.mark.parametrize("epsilon", [float("inf"), 50.0])
def test_abmll_local_posterior_persists_per_client_and_never_leaves(tiny_cfg, tmp_path, monkeypatch, epsilon) -> None:
    from fedpeft.client import app as client_app
    from fedpeft.client.runtime import runtime_for

    cfg = _cfg(tiny_cfg, "abmll", kl_weight=0.1)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, epsilon=epsilon, accountant="pld"))
    plugin, model = _model(cfg)
    state = _numpy(plugin.trainable_state(model))
    rt = runtime_for(config_to_toml(cfg), config_hash(cfg))
    seen: list[dict[str, np.ndarray]] = []
    original = rt.plugin.load_local_state

    def spy(m, s):  # type: ignore[no-untyped-def]
        seen.append({k: np.array(v, copy=True) for k, v in s.items()})
        original(m, s)

    monkeypatch.setattr(rt.plugin, "load_local_state", spy)
    contexts = [Context(run_id=1, node_id=i, node_config={"partition-id": i}, state=RecordDict(), run_config={})
                for i in range(2)]
    replies = []
    for server_round, who in ((1, 0), (1, 1), (2, 0)):
        msg = _train_msg(cfg, state, plugin.frozen_fingerprint(model), server_round, tmp_path / "ledger")
        replies.append(client_app.handle_train(msg, contexts[who]))
    assert seen[0] == {} and seen[1] == {}, "fresh clients start from the initial posterior"
    saved0 = {k: v.numpy() for k, v in contexts[0].state[client_app.LOCAL_STATE_KEY].items()}
    assert set(saved0) == set(plugin.local_state(model)) and saved0
    assert set(seen[2]) == set(saved0)
    local1 = {k: v.numpy() for k, v in contexts[1].state[client_app.LOCAL_STATE_KEY].items()}
    assert any(not np.array_equal(seen[2][k], local1[k]) for k in local1), "clients' posteriors are separate"
    assert any(np.abs(v).max() > 0 for k, v in seen[2].items() if k.endswith("post_offset")), "round 2 got round 1's"
    for reply in replies:
        arrays = reply.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        assert set(arrays.keys()) == set(state)
        for rec in reply.content.values():
            if isinstance(rec, ArrayRecord):
                assert not any(k.rsplit(".", 1)[-1] in LOCAL_NAMES for k in rec)


def test_abmll_opacus_per_sample_gradients_match_plain_gradient(tiny_cfg) -> None:
    """With the same weight samples, the mean of Opacus's per-example gradients (KL included)
    equals the ordinary gradient of the batch loss -- the grad sampler is exact."""
    from opacus import GradSampleModule

    cfg = _cfg(tiny_cfg, "abmll", kl_weight=0.5, init_std=0.02)
    plugin, model = _model(cfg)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("post_offset", "prior_mean")):
                p.normal_(0, 0.05)
    model.train()
    tok = load_tokenizer(cfg.model)
    enc = tok(["a fine film", "dull and long", "great acting here", "no"], padding=True, return_tensors="pt")
    batch, labels = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor([1, 0, 1, 0])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(3)
    plugin.loss(model, {**batch, "labels": labels}, task_for(cfg)).backward()
    plain = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model)
    torch.manual_seed(3)
    plugin.loss(gsm, {**batch, "labels": labels}, task_for(cfg)).backward()
    try:
        for n, p in params.items():
            np.testing.assert_allclose(p.grad_sample.mean(0).numpy(), plain[n].numpy(), rtol=1e-3, atol=1e-6, err_msg=n)
    finally:
        gsm._close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma", [None, 0.8])
def test_train_local_with_and_without_dp(tiny_cfg, method: str, sigma) -> None:  # type: ignore[no-untyped-def]
    from fedpeft.client.trainer import train_local

    cfg = _cfg(tiny_cfg, method)
    plugin, model = _model(cfg)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    data = client_partition(pool, cfg.data, cfg.train.clients, 0, cfg.seed)
    before = _numpy(plugin.trainable_state(model))
    result = train_local(model, plugin, load_tokenizer(cfg.model), data, cfg, 2, torch.device("cpu"), sigma, seed=dp_rng(1) if sigma is not None else 1)
    after = _numpy(plugin.trainable_state(model))
    assert result.steps == 2 and np.isfinite(result.loss_first) and np.isfinite(result.loss_last)
    assert set(after) == set(before)
    assert any(not np.array_equal(before[k], after[k]) for k in before if "classifier" not in k), "adapter trained"
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_bad_options_are_one_line_config_errors(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="adapter.options.kl_weight"):
        parse_config({"model.path": tiny_cfg.model.path, "adapter.method": "abmll", "adapter.options.kl_weight": "x"})
    with pytest.raises(ConfigError, match="unknown option for triadapt_lora"):
        parse_config({"model.path": tiny_cfg.model.path, "adapter.method": "triadapt_lora", "adapter.options.beta": 1})
    with pytest.raises(ConfigError, match="init_rank"):
        parse_config({"model.path": tiny_cfg.model.path, "adapter.method": "triadapt_lora",
                      "adapter.options.init_rank": 99})


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_real_flower_simulation(tiny_cfg, tmp_path, method: str) -> None:
    from fedpeft.sim.simulate import simulate

    cfg = _cfg(tiny_cfg, method)
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / method))
    path, rows = simulate(cfg, run_dir=tmp_path / method)
    assert len(rows) == 2 and all(r["clients_accepted"] == cfg.train.clients for r in rows)
    assert all(r["bytes_up"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (path / "adapter").exists()
