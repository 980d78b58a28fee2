"""fedpeft's own DP-SGD path, seen from the outside (issue 16, "tests that see the mechanism").

Each test runs ``fedpeft.client.trainer.train_local`` -- the function the ClientApp trains with --
with SGD, one step, and checks what the released update is made of: clipped per-example
gradients (against per-example autograd), Gaussian noise of standard deviation sigma*C/B,
Poisson batches at the rate the ledger records. A DP path that stops clipping, adds no
noise or samples at another rate than it accounts for fails here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_step import assert_dp_step_is_mean_clipped_gradient, flat_trainable

from fedpeft.adapters import get as get_plugin
from fedpeft.client.trainer import build_loader, tensorize, train_local
from fedpeft.privacy.dpsgd import make_private
from fedpeft.privacy.plan import sample_rate_for
from fedpeft.privacy.randomness import NodeSecret, RoundRandomness
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import task_for
from fedpeft.tasks.seq_cls import load_base_model

CPU = torch.device("cpu")


def _cfg(tiny_cfg, model_dir: Path, batch: int, clip: float):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        tiny_cfg,
        model=dataclasses.replace(tiny_cfg.model, path=str(model_dir)),
        train=dataclasses.replace(tiny_cfg.train, optimizer="sgd", lr=1.0, local_steps=1, batch_size=batch,
                                  physical_batch_size=16),
        privacy=dataclasses.replace(tiny_cfg.privacy, clip=clip),
    )


def _examples(cfg, n: int):  # type: ignore[no-untyped-def]
    from fedpeft.data.sources import train_test_split_for

    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    return pool.subset(list(range(n)))


def _fresh_model(cfg, plugin):  # type: ignore[no-untyped-def]
    """The adapted model with a non-zero B, so every trainable tensor has a gradient."""
    model = plugin.attach(load_base_model(cfg.model, 2, head_seed=cfg.adapter.seed), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _rng() -> RoundRandomness:
    return RoundRandomness.derived(NodeSecret.generate(), "test")


def test_one_step_without_noise_is_minus_the_mean_clipped_per_example_gradient(tiny_cfg, still_model_dir) -> None:  # type: ignore[no-untyped-def]
    """q = 1 (the batch is the whole data), sigma = 0, a tiny clip: the update must equal
    -lr * mean_i clip_C(g_i) with g_i from per-example autograd (a DP path that stops
    clipping, or clips the batch instead of each example, fails)."""
    n, clip = 12, 1e-3
    cfg = _cfg(tiny_cfg, still_model_dir, batch=n, clip=clip)
    plugin = get_plugin(cfg.adapter.method)
    assert_dp_step_is_mean_clipped_gradient(cfg, plugin, lambda: _fresh_model(cfg, plugin), _examples(cfg, n), clip)


def test_noise_has_standard_deviation_sigma_clip_over_batch(tiny_cfg, still_model_dir) -> None:  # type: ignore[no-untyped-def]
    """sigma > 0 and a clip so small that the signal is ~0: the update's coordinates are
    N(0, (lr sigma C / B)^2). A path that adds no noise, or the wrong amount, fails."""
    n, clip, sigma = 12, 1e-6, 1.5
    cfg = _cfg(tiny_cfg, still_model_dir, batch=n, clip=clip)
    plugin, tok, data = get_plugin(cfg.adapter.method), load_tokenizer(cfg.model), _examples(cfg, n)
    model = _fresh_model(cfg, plugin)
    before = flat_trainable(model)
    train_local(model, plugin, tok, data, cfg, 1, CPU, sigma, _rng())
    update = (flat_trainable(model) - before).numpy().astype(np.float64)
    expected_std = cfg.train.lr * sigma * clip / n
    d = update.size
    assert d > 500
    # the sample std of d normals is within 4 standard errors (sqrt(1/(2d))) of the truth
    assert abs(update.std() / expected_std - 1) < 4 / math.sqrt(2 * d)
    assert abs(update.mean()) < 4 * expected_std / math.sqrt(d)


def test_poisson_batches_are_sampled_at_the_rate_the_ledger_records(tiny_cfg, still_model_dir, tmp_path: Path,
                                                                    flwr_identity) -> None:  # type: ignore[no-untyped-def]
    """The loader fedpeft's DP path builds samples each example with probability q, and q
    is the rate the ClientApp writes into the ledger (a DP path that accounts at another
    rate than it samples at fails)."""
    from flwr.app import Context, Message, RecordDict

    from fedpeft.client.app import handle_train
    from fedpeft.config import config_hash, config_to_toml
    from fedpeft.privacy.ledger import Ledger
    from fedpeft.server.loop import ServerSetup
    from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, batch_size=16, rounds=1,
                                                                  local_steps=1))
    setup = ServerSetup(cfg)
    strategy = AdapterAvg.from_config(setup.plugin, cfg, setup.spec, config_to_toml(cfg), config_hash(cfg),
                          extra_config={"ledger-dir": str(tmp_path / "ledger")})
    msg = Message(content=RecordDict({"arrays": state_to_arrayrecord(setup.state),
                                      "config": strategy.round_config(1)}), dst_node_id=7, message_type="train")
    reply = handle_train(msg, Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                                      state=RecordDict(), run_config={}))
    entry = Ledger.from_json((tmp_path / "ledger" / "client-0.json").read_text()).entries[-1]
    n = int(reply.content["metrics"]["num-examples"])
    assert entry.sample_rate == float(reply.content["metrics"]["sample-rate"]) == sample_rate_for(n, 16)
    # the loader the DP path really uses, on data of that size: its empirical rate
    tok, plugin = load_tokenizer(cfg.model), get_plugin(cfg.adapter.method)
    ds = tensorize(tok, _examples(cfg, n), cfg.model.max_length, task_for(cfg))
    model = _fresh_model(cfg, plugin)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    parts = make_private(model, opt, build_loader(ds, 16, 0), 1.0, 1.0, _rng())
    assert parts.sample_rate == entry.sample_rate
    sizes: list[int] = []
    for _ in range(60):
        sizes.extend(len(batch[0]) for batch in parts.loader)
    rate = float(np.mean(sizes)) / n
    stderr = math.sqrt(entry.sample_rate * (1 - entry.sample_rate) / (n * len(sizes)))
    assert abs(rate - entry.sample_rate) < 4 * stderr, (rate, entry.sample_rate)


def test_dp_training_refuses_a_plain_seed(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    plugin, tok = get_plugin(tiny_cfg.adapter.method), load_tokenizer(tiny_cfg.model)
    model = _fresh_model(tiny_cfg, plugin)
    with pytest.raises(TypeError, match="RoundRandomness"):
        train_local(model, plugin, tok, _examples(tiny_cfg, 8), tiny_cfg, 1, CPU, 1.0, 1234)
