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
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_step import assert_dp_step_is_mean_clipped_gradient, flat_trainable
from tiny_model import dp_rng

from fedpeft.adapters import get as get_plugin
from fedpeft.client.trainer import build_loader, tensorize, train_local
from fedpeft.privacy.dpsgd import PoissonLoader, make_private
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


# --- make_private, SecretNoise and PoissonLoader on a tiny MLP (mutation testing, issue 21) ---
# Exact checks of what fedpeft.privacy.dpsgd adds to Opacus: the noise is the node's ChaCha stream
# (secure_mode: four draws), Opacus's guards stay on, Poisson batches may be empty and keep their shape.

_NOT_A_SEED = ("make_private needs the node's RoundRandomness (fedpeft.privacy.randomness); "
               "a seed is not allowed")


def _mlp_data(n: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(n)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen))


def _mlp_private(n: int = 6, sigma: float = 1.3, clip: float = 0.5, rng: RoundRandomness | None = None,
                 **kw):  # type: ignore[no-untyped-def]
    """make_private over a 3-4-2 MLP and ``n`` examples in one batch (q = 1: every example, every step)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(model, opt, torch.utils.data.DataLoader(_mlp_data(n), batch_size=n), sigma, clip,
                        rng if rng is not None else dp_rng(3), **kw)


def _mlp_backward(parts) -> None:  # type: ignore[no-untyped-def]
    x, y = next(iter(parts.loader))
    torch.nn.functional.cross_entropy(parts.module(x), y).backward()


def _assert_grads_are(parts, stream, std: float, secure: bool) -> None:  # type: ignore[no-untyped-def]
    """p.grad == (clipped sum + the stream's next N(0, std^2) draw) / B, bit for bit, in parameter order."""
    for p in parts.optimizer.params:
        noise = stream.gaussian_like(p.summed_grad, std, secure) if std > 0 else torch.zeros_like(p.summed_grad)
        assert torch.equal(p.grad, (p.summed_grad + noise).view_as(p) / parts.optimizer.expected_batch_size)


@pytest.mark.parametrize("secure_mode", [None, False, True])
def test_make_private_noise_is_the_node_stream_added_to_the_clipped_sum(secure_mode) -> None:  # type: ignore[no-untyped-def]
    """The noise of a step is exactly rng.noise()'s next Gaussians of std sigma*C, added (not subtracted)
    to Opacus's clipped sum; secure_mode (default off) uses the four-draw form."""
    rng, sigma, clip = dp_rng(3), 1.3, 0.5
    parts = _mlp_private(6, sigma, clip, rng, **({} if secure_mode is None else {"secure_mode": secure_mode}))
    assert parts.optimizer.expected_batch_size == 6
    _mlp_backward(parts)
    parts.optimizer.step()
    _assert_grads_are(parts, rng.noise(), sigma * clip, bool(secure_mode))


def test_a_noiseless_step_draws_nothing_from_the_noise_stream() -> None:
    """Opacus's LambdaNoise warm-up (sigma 0 on step 0): the first noisy step gets the stream's first draw,
    so a replay of the node's noise (the canary audit's known_noise) lines up with the noisy steps."""
    from opacus.schedulers import LambdaNoise

    rng, sigma, clip = dp_rng(4), 1.3, 0.5
    parts = _mlp_private(6, sigma, clip, rng)
    sched = LambdaNoise(parts.optimizer, noise_lambda=lambda epoch: float(epoch > 0))
    assert parts.optimizer.noise_multiplier == 0
    stream = rng.noise()
    _mlp_backward(parts)
    parts.optimizer.step()
    _assert_grads_are(parts, stream, 0.0, False)
    parts.optimizer.zero_grad()
    sched.step()
    assert parts.optimizer.noise_multiplier == sigma
    _mlp_backward(parts)
    parts.optimizer.step()
    _assert_grads_are(parts, stream, sigma * clip, False)


def test_secret_noise_keeps_opacus_guard_against_noising_a_sum_twice() -> None:
    """Opacus marks a noised sum as used: noising it again before zero_grad() raises (the mixin must keep it)."""
    parts = _mlp_private()
    _mlp_backward(parts)
    parts.optimizer.step()
    with pytest.raises(ValueError, match="zero_grad"):
        parts.optimizer.add_noise()
    parts.optimizer.zero_grad()
    _mlp_backward(parts)
    parts.optimizer.step()  # after zero_grad() the next step is fine


def test_make_private_forbids_gradient_accumulation_under_poisson_sampling() -> None:
    """Two backward passes without a step would merge two Poisson batches (not what is accounted): refused."""
    parts = _mlp_private()
    _mlp_backward(parts)
    with pytest.raises(ValueError, match="Poisson sampling is not compatible with grad accumulation"):
        _mlp_backward(parts)


def test_make_private_passes_grad_sample_mode_to_opacus() -> None:
    """grad_sample_mode reaches Opacus's wrapper: "functorch" makes it compute per-example gradients with functorch."""
    assert _mlp_private().module.force_functorch is False
    parts = _mlp_private(grad_sample_mode="functorch")
    assert parts.module.force_functorch is True
    _mlp_backward(parts)
    parts.optimizer.step()
    assert all(p.grad is not None for p in parts.optimizer.params)


def test_make_private_refuses_a_plain_seed_with_its_message() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_mlp_data(4), batch_size=4)
    with pytest.raises(TypeError, match=f"^{re.escape(_NOT_A_SEED)}$"):
        make_private(model, opt, loader, 1.0, 1.0, 1234)  # type: ignore[arg-type]


def test_poisson_loader_on_a_single_example() -> None:
    parts = _mlp_private(n=1)
    assert parts.sample_rate == 1.0
    (x, y), = list(parts.loader)
    data = _mlp_data(1)
    assert torch.equal(x, data.tensors[0]) and torch.equal(y, data.tensors[1])


def _assert_empty_batch(batch, data) -> None:  # type: ignore[no-untyped-def]
    """An empty Poisson batch: one zero-length tensor per field, with the field's trailing shape and dtype."""
    assert [(tuple(t.shape), t.dtype) for t in batch] == [((0, *t.shape[1:]), t.dtype) for t in data.tensors]


def test_poisson_loader_first_batch_empty_has_the_datasets_shapes() -> None:
    """The very first batch empty (nothing to copy the structure from): zero-length tensors shaped like an example."""
    data = _mlp_data(3)
    loader = PoissonLoader(data, 0.01, dp_rng(0).sampling())
    first = next(iter(loader))
    _assert_empty_batch(first, data)
    assert torch.nn.Sequential(torch.nn.Linear(3, 2))(first[0]).shape == (0, 2)


def test_poisson_loader_empty_batch_after_a_full_one_keeps_its_structure() -> None:
    data = _mlp_data(2)
    loader = PoissonLoader(data, 0.5, dp_rng(1).sampling())
    batches = [b for _ in range(10) for b in loader]
    assert len(batches[0][0]) > 0  # the collate learns the structure from a non-empty batch first
    empties = [b for b in batches if len(b[1]) == 0]
    assert empties and len(empties) < len(batches)
    for b in empties:
        _assert_empty_batch(b, data)
    for b in batches:
        assert len(b) == 2 and b[0].shape[1:] == (3,) and b[0].dtype == torch.float32
