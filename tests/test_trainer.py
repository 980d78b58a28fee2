"""Local training mechanics: length-bucketed physical chunks change nothing in the maths."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from tiny_model import dp_rng
from torch import nn
from torch.utils.data import TensorDataset

from fedpeft.adapters import get
from fedpeft.client import trainer
from fedpeft.client.trainer import (
    build_loader,
    length_buckets,
    local_steps,
    make_optimizer,
    proximal_term,
    tensorize,
    train_local,
)
from fedpeft.data.sources import train_test_split_for
from fedpeft.privacy.dpsgd import make_private
from fedpeft.tasks.model import load_tokenizer
from fedpeft.tasks.registry import task_for
from fedpeft.tasks.seq_cls import load_base_model


def test_length_buckets_cover_every_example_once_trimmed_to_their_own_width() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (37,), generator=gen)
    mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
    ids = torch.arange(37)[:, None].expand(37, 20) * mask  # row id in every real token
    labels = torch.arange(37)
    chunks = length_buckets(ids, mask, labels, chunk=8)
    assert [len(c[2]) for c in chunks] == [8, 8, 8, 8, 5]
    assert sorted(torch.cat([c[2] for c in chunks]).tolist()) == list(range(37))
    for cid, cmask, clabels in chunks:
        assert cmask.shape[1] == int(lengths[clabels].max())  # trimmed to the chunk's own longest row
        assert torch.equal(cid[:, 0], clabels)  # rows stay aligned with their labels
    assert length_buckets(ids[:0], mask[:0], labels[:0], chunk=8) == []


def _setup(tiny_cfg, physical: int):  # type: ignore[no-untyped-def]
    train = dataclasses.replace(tiny_cfg.train, batch_size=32, physical_batch_size=physical, lr=1.0, optimizer="sgd")
    cfg = dataclasses.replace(tiny_cfg, train=train)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    plugin = get("ffa_lora")
    model = plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=cfg.adapter.seed), cfg)
    for module in model.modules():  # same function whatever the chunking
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return cfg, plugin, model, pool.subset(np.arange(64)), load_tokenizer(cfg.model)


def test_dp_step_is_identical_whatever_the_physical_chunk_size(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    updates = []
    for physical in (5, 64):
        cfg, plugin, model, data, tok = _setup(tiny_cfg, physical)
        before = {k: v.clone() for k, v in plugin.trainable_state(model).items()}
        train_local(model, plugin, tok, data, cfg, steps=1, device=torch.device("cpu"), noise_multiplier=0.0, seed=dp_rng(3))
        after = plugin.trainable_state(model)
        updates.append({k: after[k] - before[k] for k in before})
    assert any(float(u.abs().max()) > 0 for u in updates[0].values())
    for key in updates[0]:
        torch.testing.assert_close(updates[0][key], updates[1][key], rtol=1e-4, atol=1e-7)


def test_empty_poisson_batches_still_take_noisy_steps(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1, lr=1e-3))
    data = data.subset(np.arange(2))  # sample rate 1/2: about a quarter of the batches are empty
    before = {k: v.clone() for k, v in plugin.trainable_state(model).items()}
    result = train_local(model, plugin, tok, data, cfg, steps=12, device=torch.device("cpu"),
                         noise_multiplier=1.0, seed=dp_rng(0))
    assert result.steps == 12 and result.samples_seen < 12 * 2
    after = plugin.trainable_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(after[k], before[k]) for k in before)


# --- a round's counts, losses, loader and options (issue 21: mutation survivors) ---------------------------


def _cfg(cfg, **train):  # type: ignore[no-untyped-def]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _dp_or_plain(dp: bool, seed: int = 1):  # type: ignore[no-untyped-def]
    return (0.0, dp_rng(seed)) if dp else (None, seed)


def test_local_steps_is_the_override_or_local_epochs_times_batches_rounded_up(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    assert local_steps(_cfg(tiny_cfg, local_steps=7, batch_size=16), 40) == 7
    epochs = [(1.0, 16, 40, 3), (2.0, 16, 40, 6), (0.5, 16, 40, 2), (1.0, 8, 4, 1), (0.1, 16, 40, 1), (3.0, 64, 40, 3)]
    for local_epochs, batch_size, n, expected in epochs:
        cfg = _cfg(tiny_cfg, local_steps=0, local_epochs=local_epochs, batch_size=batch_size)
        assert local_steps(cfg, n) == expected, (local_epochs, batch_size, n)


def test_build_loader_shuffles_by_its_own_seed_into_ceil_n_over_b_batches() -> None:
    dataset = TensorDataset(torch.arange(10))

    def order(seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the loader's order must not depend on torch's global RNG
        loader = build_loader(dataset, 4, seed)
        assert len(loader) == 3 and [len(b[0]) for b in loader] == [4, 4, 2]  # the last batch is kept
        return torch.cat([b[0] for b in build_loader(dataset, 4, seed)]).tolist()

    first = order(7, 0)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert order(7, 1) == first and order(7, 2) == first
    assert order(8, 0) != first
    assert len(build_loader(dataset, 32, 0)) == 1  # the batch is capped at the dataset


def test_make_optimizer_sgd_with_momentum_or_adam_at_the_configured_lr(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(_cfg(tiny_cfg, optimizer="sgd", lr=0.123), params)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == 0.123 and sgd.param_groups[0]["momentum"] == 0.9
    adam = make_optimizer(_cfg(tiny_cfg, optimizer="adam", lr=0.123), params)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.123


def test_proximal_term_refuses_parameters_added_after_its_anchor() -> None:
    params = [nn.Parameter(torch.ones(2))]
    add = proximal_term(params, 0.5)
    assert add is not None
    params.append(nn.Parameter(torch.ones(3)))  # would otherwise get no proximal pull, silently
    with pytest.raises(ValueError):
        add()


def test_tensorize_pads_every_example_to_max_length(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    pool, _ = train_test_split_for(tiny_cfg.data, tiny_cfg.seed)
    dataset = tensorize(load_tokenizer(tiny_cfg.model), pool.subset(np.arange(6)), 24, task_for(tiny_cfg))
    assert dataset.keys == ("input_ids", "attention_mask", "labels")
    assert [tuple(t.shape) for t in dataset.tensors] == [(6, 24), (6, 24), (6,)]


def _reference_loss(cfg, plugin, model, data, tok) -> float:  # type: ignore[no-untyped-def]
    task_type = task_for(cfg)
    with torch.no_grad():
        return float(plugin.loss(model, task_type.encode(tok, data, cfg.model.max_length), task_type))


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_a_round_reports_the_batch_mean_loss_over_its_chunks(tiny_cfg, dp: bool) -> None:  # type: ignore[no-untyped-def]
    """16 examples, batch 32: every batch is all 16 (DP: Poisson at rate 1), cut into chunks
    of 5, 5, 5 and 1; with lr 0 each step's loss is the whole data's mean loss."""
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 5)
    cfg, data = _cfg(cfg, lr=0.0), data.subset(np.arange(16))
    expected = _reference_loss(cfg, plugin, model, data, tok)
    sigma, seed = _dp_or_plain(dp)
    start = time.perf_counter()
    result = train_local(model, plugin, tok, data, cfg, steps=2, device=torch.device("cpu"),
                         noise_multiplier=sigma, seed=seed)
    elapsed = time.perf_counter() - start
    for loss in (result.loss_first, result.loss_mean, result.loss_last):
        assert loss == pytest.approx(expected, rel=1e-5)
    assert (result.steps, result.examples, result.samples_seen, result.sample_rate) == (2, 16, 32, 1.0)
    assert 0 < result.seconds <= elapsed
    if dp:  # the round leaves no gradient (nor Opacus's per-sample state) on the model
        assert all(p.grad is None for p in model.parameters())


def test_a_plain_round_cycles_the_loader_and_counts_every_example_it_saw(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 16)
    cfg, data = _cfg(cfg, batch_size=16, lr=0.0), data.subset(np.arange(40))
    result = train_local(model, plugin, tok, data, cfg, steps=4, device=torch.device("cpu"), noise_multiplier=None,
                         seed=0)
    # batches of 16, 16 and 8 (the last one kept), then 16 again: the loader's length sets the rate
    assert (result.samples_seen, result.sample_rate, result.examples) == (56, pytest.approx(1 / 3), 40)


EMPTY_FIRST_BATCH = 2  # dp_rng seed whose first Poisson batch (rate 1/2, two examples) is empty


def test_an_all_empty_dp_round_reports_nan_losses_and_no_examples(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    cfg, data = _cfg(cfg, batch_size=1, lr=1e-3), data.subset(np.arange(2))  # rate 1/2
    result = train_local(model, plugin, tok, data, cfg, steps=1, device=torch.device("cpu"), noise_multiplier=1.0,
                         seed=dp_rng(EMPTY_FIRST_BATCH))
    assert (result.steps, result.samples_seen, result.sample_rate) == (1, 0, 0.5)
    assert math.isnan(result.loss_first) and math.isnan(result.loss_mean) and math.isnan(result.loss_last)


def test_secure_mode_reaches_the_dp_noise(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """``privacy.secure_mode`` sums four draws per noise value: the same keys give other noise."""
    updates = []
    for secure in (False, False, True):
        cfg, plugin, model, data, tok = _setup(tiny_cfg, 32)
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, secure_mode=secure))
        train_local(model, plugin, tok, data.subset(np.arange(8)), _cfg(cfg, lr=0.1), steps=1,
                    device=torch.device("cpu"), noise_multiplier=1.0, seed=dp_rng(2))
        updates.append(plugin.trainable_state(model))
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])  # reproducible keys
    assert not all(torch.equal(updates[0][k], updates[2][k]) for k in updates[0])


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_the_model_and_every_chunk_go_to_the_given_device(tiny_cfg, monkeypatch, dp: bool) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 4)
    device = torch.device("cpu")
    seen: list[object] = []
    real_to_device, real_to = trainer.to_device, model.to

    def to_device(batch, dev):  # type: ignore[no-untyped-def]
        seen.append(dev)
        return real_to_device(batch, dev)

    def to(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(args)
        return real_to(*args, **kwargs)

    monkeypatch.setattr(trainer, "to_device", to_device)
    model.to = to  # type: ignore[method-assign]
    sigma, seed = _dp_or_plain(dp)
    train_local(model, plugin, tok, data.subset(np.arange(8)), _cfg(cfg, batch_size=8), steps=1, device=device,
                noise_multiplier=sigma, seed=seed)
    assert seen[0] == (device,) and len(seen) > 2 and all(dev is device for dev in seen[1:])


def test_an_empty_batch_gets_per_sample_gradients_on_the_parameters_device(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """On a GPU the default device (CPU) is not the parameters'; here the default is made 'meta'."""
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    task_type = task_for(cfg)
    dataset = tensorize(tok, data.subset(np.arange(4)), cfg.model.max_length, task_type)
    params = [p for p in model.parameters() if p.requires_grad]
    parts = make_private(model, make_optimizer(cfg, params), build_loader(dataset, 2, 0), 1.0, 1.0, dp_rng(0))
    empty = dataset.as_batch([t[:0] for t in dataset.tensors])
    before = [p.detach().clone() for p in params]
    with torch.device("meta"):
        loss, n = trainer._dp_step(parts.module, parts.optimizer, plugin, task_type, empty, 8, torch.device("cpu"))
    parts.module._close()
    assert (loss, n) == (0.0, 0)
    assert all(p.device.type == "cpu" and not torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_the_encoded_batch_replaces_the_tokenizer(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    data = data.subset(np.arange(8))
    encoded = task_for(cfg).encode(tok, data, cfg.model.max_length)
    result = train_local(model, plugin, None, data, cfg, steps=1, device=torch.device("cpu"), noise_multiplier=None,
                         seed=0, encoded=encoded)
    assert result.samples_seen == 8


def test_dp_refuses_an_integer_seed(tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    with pytest.raises(TypeError, match=r"^DP-SGD needs the node's RoundRandomness, not an integer seed \(the server may know it\)$"):
        train_local(model, plugin, tok, data, cfg, steps=1, device=torch.device("cpu"), noise_multiplier=1.0, seed=3)


# --- the progress bar (on by default; FEDPEFT_PROGRESS=0 hides it; conftest sets 0 for the suite) ----------


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_the_progress_bar_ticks_once_per_step_on_stderr_and_clears_itself(tiny_cfg, monkeypatch, capsys,
                                                                          dp: bool) -> None:  # type: ignore[no-untyped-def]
    """Shown whether or not stderr is a terminal (Flower's log file gets it); gone when the round ends."""
    monkeypatch.delenv("FEDPEFT_PROGRESS", raising=False)
    ends: list[tuple[float, float | None]] = []

    class Bar(trainer.tqdm):  # type: ignore[misc, name-defined]
        def close(self) -> None:
            if not self.disable:
                ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(trainer, "tqdm", Bar)
    cfg, plugin, model, data, tok = _setup(tiny_cfg, 8)
    sigma, seed = _dp_or_plain(dp)
    train_local(model, plugin, tok, data.subset(np.arange(8)), _cfg(cfg, batch_size=8), steps=2,
                device=torch.device("cpu"), noise_multiplier=sigma, seed=seed)
    err = capsys.readouterr().err
    assert err.startswith("\rlocal training:   0%|") and "| 0/2 [00:00<?, ?step/s]" in err
    assert ends == [(2, 2)]
    assert "\n" not in err and err.endswith("\r")  # leave=False: the bar is erased, nothing is left behind


def test_fedpeft_progress_0_hides_the_bar(tiny_cfg, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FEDPEFT_PROGRESS", "0")
    bar = trainer._progress(3, "client 1 round 1")
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""


def test_the_progress_bar_redraws_at_most_every_two_seconds(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Every client's bar of a simulation goes to one log file (README): redraws are throttled."""
    import tqdm.std

    monkeypatch.delenv("FEDPEFT_PROGRESS", raising=False)
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    bar = trainer._progress(5, "client 1 round 1")
    for t in (1.9, 2.1, 3.0):
        now[0] = t
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("\rclient 1 round 1:   0%|") and "| 0/5 [" in err
    assert "1/5" not in err and "| 2/5 [" in err and "3/5" not in err
