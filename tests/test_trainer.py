"""Local training mechanics: length-bucketed physical chunks change nothing in the maths."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tiny_model import dp_rng
from torch import nn

from fedpeft.adapters import get
from fedpeft.client.trainer import length_buckets, train_local
from fedpeft.data.sources import train_test_split_for
from fedpeft.tasks.model import load_tokenizer
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
