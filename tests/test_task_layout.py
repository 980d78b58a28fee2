"""A single-task run is a task layout of one task (src/fedpeft/data/layout.py, src/fedpeft/tasks/heads.py):
built from ``[data]`` exactly as single-task runs always were; ``[tasks]`` gives one task per entry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fedpeft.adapters import get as get_plugin
from fedpeft.client.runtime import ClientIdentity, Runtime
from fedpeft.config import RunConfig
from fedpeft.config.tasks import TasksConfig
from fedpeft.data.layout import task_layout
from fedpeft.data.partition import client_partition
from fedpeft.data.sources import train_test_split_for
from fedpeft.server.setup import ServerSetup
from fedpeft.strategies.adapter_avg import AdapterAvg
from fedpeft.strategies.multitask_avg import MultiTaskAvg, MultiTaskSpec
from fedpeft.strategies.registry import build_base
from fedpeft.tasks.seq_cls import load_base_model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_single_task_layout_is_the_single_task_construction(tiny_cfg: RunConfig) -> None:
    """One task whose splits, client partitions and model equal the direct construction
    (train split of ``[data]``, ``client_partition`` with ``data.partition``, the base model
    with a head of the pool's classes seeded from the adapter seed, then ``plugin.attach``)."""
    cfg = tiny_cfg
    layout = task_layout(cfg)
    assert len(layout) == 1 and not layout.per_task
    pool, test = train_test_split_for(cfg.data, cfg.seed)
    (task,) = layout
    assert task.pool.texts == pool.texts and task.test.texts == test.texts
    np.testing.assert_array_equal(task.pool.labels, pool.labels)
    assert list(task.clients) == list(range(cfg.train.clients))

    rt = Runtime(cfg)
    for pid in range(cfg.train.clients):
        want = client_partition(pool, cfg.data, cfg.train.clients, pid, cfg.seed)
        got = rt.data_for(ClientIdentity(str(pid), pid, "", Path("ledger")), {})
        assert got.texts == want.texts
        np.testing.assert_array_equal(got.labels, want.labels)

    plugin = get_plugin(cfg.adapter.method)
    expected = _state(plugin.attach(load_base_model(cfg.model, pool.num_classes, head_seed=cfg.adapter.seed), cfg))
    _assert_same(_state(rt.model), expected)
    setup = ServerSetup(cfg)
    _assert_same(_state(setup.model), expected)
    assert setup.hooks == [] and type(build_base(cfg, setup.plugin, setup.spec, "", "h")) is AdapterAvg and not isinstance(setup.spec, MultiTaskSpec)
    assert set(setup.evaluate()) == {"accuracy", "loss", "examples"}  # no per-task keys in its rows


def test_multi_task_config_builds_one_task_per_entry(tiny_cfg: RunConfig) -> None:
    cfg = dataclasses.replace(
        tiny_cfg, tasks=TasksConfig(names=("rt", "bbc", "tweets"), clients_per_task=2, public_size=16),
        train=dataclasses.replace(tiny_cfg.train, clients=6), data=dataclasses.replace(tiny_cfg.data, test_size=30),
        adapter=dataclasses.replace(tiny_cfg.adapter, method="mtlora"),
    )
    layout = task_layout(cfg)
    assert layout.per_task and [t.name for t in layout] == ["rt", "bbc", "tweets"]
    assert [layout.client_task(pid).name for pid in range(6)] == ["rt", "rt", "bbc", "bbc", "tweets", "tweets"]
    setup = ServerSetup(cfg)
    assert type(build_base(cfg, setup.plugin, setup.spec, "", "h")) is MultiTaskAvg and set(setup.spec.task_specs) == {"rt", "bbc", "tweets"}  # type: ignore[attr-defined]
    heads = {k for k in setup.state if k.startswith("classifier.task_") and k.endswith(".weight")}
    assert {k: setup.state[k].shape[0] for k in heads} == {
        "classifier.task_rt.weight": 2, "classifier.task_bbc.weight": 5, "classifier.task_tweets.weight": 3}
