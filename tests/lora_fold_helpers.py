"""Shared checks of the methods that fold a server-computed delta into the frozen weight
(``fedex_lora``, ``flora``: :mod:`fedpeft.adapters.lora_fold`), used by tests/test_fedex_lora.py and
tests/test_flora.py: effective weights, hand-made global states, one DP step against per-example
autograd, and a small in-process federation that records what travels both ways."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_step import assert_dp_step_is_mean_clipped_gradient
from inprocess_grid import LocalGrid

from fedpeft.adapters import get
from fedpeft.adapters.lora import lora_layers
from fedpeft.adapters.lora_fold import DELTA_SUFFIX, delta_key
from fedpeft.data.sources import train_test_split_for
from fedpeft.load import parse_config
from fedpeft.server.checkpoint import load_checkpoint
from fedpeft.server.loop import RoundHook, run_federation
from fedpeft.server.setup import ServerSetup
from fedpeft.tasks.seq_cls import load_base_model

CPU = torch.device("cpu")


def attached(cfg: Any, method: str, **adapter: Any):  # type: ignore[no-untyped-def]
    """(plugin, cfg, model) of ``method`` on the tiny BERT (``adapter`` overrides ``cfg.adapter``)."""
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, method=method, **adapter))
    plugin = get(method)
    torch.manual_seed(0)
    return plugin, cfg, plugin.attach(load_base_model(cfg.model, 2, head_seed=cfg.adapter.seed), cfg)


def effective_weights(model: Any) -> dict[str, np.ndarray]:
    """Every adapted layer's W as the forward pass uses it: frozen weight + s * B @ A (float64)."""
    return {n: (layer.get_base_layer().weight.detach().double() + layer.get_delta_weight("default").detach().double()).numpy()
            for n, layer in lora_layers(model)}


def random_global(plugin: Any, model: Any, seed: int, delta_scale: float = 0.05) -> dict[str, np.ndarray]:
    """A global state of the model's shapes with random A, B, head and frozen delta."""
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(scale=0.2, size=v.shape).astype(np.float32)
             for k, v in plugin.trainable_state(model).items()}
    for name, layer in lora_layers(model):
        state[delta_key(name)] = rng.normal(scale=delta_scale, size=layer.get_base_layer().weight.shape).astype(
            np.float32)
    return state


def reply_of(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a global state a client sends back (everything but the frozen delta)."""
    return {k: v for k, v in state.items() if not k.endswith(DELTA_SUFFIX)}


def learns_beyond_random(cfg: Any, method: str) -> None:
    """As tests/test_methods_learn.py: 20 plain steps of the adapter alone (head frozen) on one
    fixed batch lower the loss by more than a same-norm random update
    (:func:`tiny_model.adapter_alone_lowers_loss`)."""
    from tiny_model import adapter_alone_lowers_loss

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=32, physical_batch_size=32, lr=3e-2))
    plugin, cfg, model = attached(cfg, method)
    pool, _ = train_test_split_for(cfg.data, cfg.seed)
    adapter_alone_lowers_loss(model, plugin, cfg, pool.subset(np.arange(32)), steps=20)


def weighted(values: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: sum(wi * v[k] for wi, v in zip(w, values, strict=True)) for k in values[0]}


def dp_step_matches_clipped_per_example_mean(cfg: Any, plugin: Any, make_model: Any, n: int = 8,
                                             clip: float = 1e-3) -> None:
    """One DP-SGD step (q = 1, sigma = 0, SGD lr 1, a clip every example exceeds) moves the
    trainable tensors by exactly ``-mean_i clip_C(g_i)`` with g_i from per-example autograd
    (as tests/test_dp_mechanism.py); the frozen weights do not move."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="sgd", lr=1.0, local_steps=1,
                                                             batch_size=n, physical_batch_size=4),
                              privacy=dataclasses.replace(cfg.privacy, clip=clip))
    pool, _ = train_test_split_for(cfg.data, cfg.seed)

    def fresh() -> torch.nn.Module:
        m = make_model(cfg)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        return m

    frozen_before = {n: p.detach().clone() for n, p in fresh().named_parameters() if not p.requires_grad}
    model = assert_dp_step_is_mean_clipped_gradient(cfg, plugin, fresh, pool.subset(list(range(n))), clip)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


class RecordingGrid(LocalGrid):
    """A :class:`LocalGrid` that keeps every reply's tensor names and byte size."""

    def __init__(self, clients: int, app: Any = None) -> None:
        super().__init__(clients, app=app)
        self.reply_keys: list[set[str]] = []
        self.reply_shapes: list[dict[str, tuple[int, ...]]] = []

    def _answer(self, msg: Any) -> Any:
        reply = super()._answer(msg)
        if not reply.has_error():
            for record in reply.content.array_records.values():
                self.reply_keys.append(set(record.keys()))
                self.reply_shapes.append({k: tuple(v.shape) for k, v in record.items()})
        return reply


def federation_cfg(model_dir: Path, out: Path, method: str, rounds: int = 2, **extra: Any):  # type: ignore[no-untyped-def]
    """Two clients, both every round, one local step each, no DP: a run whose replies are a
    pure function of its inputs (so a resumed run can be compared bit for bit)."""
    return parse_config({
        "model.path": str(model_dir), "model.max_length": 16, "data.examples_per_client": 16, "data.test_size": 16,
        "train.clients": 2, "train.rounds": rounds, "train.batch_size": 16, "train.local_steps": 1,
        "train.lr": 0.05, "adapter.method": method, "adapter.rank": 4, "privacy.epsilon": "inf",
        "output_dir": str(out), **extra,
    })


class Crash(RoundHook):
    def on_round_end(self, server_round: int, row: dict[str, Any], report: Any) -> None:
        if server_round == 2:
            raise RuntimeError("server lost")


def federate_and_resume(tiny_model_dir: Path, tmp_path: Path, method: str) -> dict[str, np.ndarray]:
    """Two in-process rounds: replies carry exactly the reply spec, instructions the spec plus
    every frozen delta, bytes are counted both ways, the checkpoint holds a non-zero delta, the
    server's evaluation used it, and a run lost in round 2 and resumed ends with the same
    state; returns the final global state."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    grid = RecordingGrid(2)
    ref_rows = run_federation(grid, federation_cfg(tiny_model_dir, reference, method), reference)  # type: ignore[arg-type]
    setup = ServerSetup(federation_cfg(tiny_model_dir, reference, method))
    deltas = {k for k in setup.state if k.endswith(DELTA_SUFFIX)}
    # what travels: replies carry exactly the spec; the server's instructions the spec plus every delta
    assert grid.reply_keys and all(keys == set(setup.spec.tensors) for keys in grid.reply_keys)
    assert all(set(m.content.array_records["arrays"].keys()) == set(setup.spec.tensors) | deltas for m in grid.sent)
    delta_bytes = sum(setup.state[k].nbytes for k in deltas)
    for row in ref_rows:
        assert setup.spec.nbytes * 2 <= row["bytes_up"] <= (setup.spec.nbytes + 256 * len(setup.spec.tensors)) * 2
        assert row["bytes_down"] >= 2 * (setup.spec.nbytes + delta_bytes)
    final = load_checkpoint(reference / "checkpoint.npz").state
    assert all(np.abs(final[k]).max() > 0 for k in deltas)  # a residual was folded and checkpointed
    # the server's own model evaluated the folded weights: its loss is that of W0 + s (D + B A)
    setup.set_state(final)
    assert setup.evaluate()["loss"] == pytest.approx(ref_rows[-1]["loss"], rel=1e-6)
    # the evaluation reads the fold: another fold, another loss. FedEx-LoRA's two-round residual is
    # second order and the tiny model's small head keeps its loss near ln 2, so the probe is a fold
    # of 0.5 everywhere (it moves the loss by ~1e-5 relative; a server that ignored the fold: 0)
    setup.set_state({**final, **{k: np.full_like(final[k], 0.5) for k in deltas}})
    assert setup.evaluate()["loss"] != pytest.approx(ref_rows[-1]["loss"], rel=1e-7, abs=0)

    cfg = federation_cfg(tiny_model_dir, run, method)
    with pytest.raises(RuntimeError, match="server lost"):
        run_federation(RecordingGrid(2), cfg, run, hooks=[Crash()])  # type: ignore[arg-type]
    assert load_checkpoint(run / "checkpoint.npz").server_round == 1
    rows = run_federation(RecordingGrid(2), cfg, run, resume=True)  # type: ignore[arg-type]
    got = load_checkpoint(run / "checkpoint.npz").state
    assert sorted(got) == sorted(final)
    for k in final:  # same configuration apart from output_dir: the same releases, the same fold
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 2
    return final


def one_dp_round(tiny_model_dir: Path, tmp_path: Path, method: str) -> dict[str, np.ndarray]:
    """One DP-SGD round through the real round loop and ClientApp: both replies accepted, the
    clients spent budget, their DP replies carry no training loss, a non-zero delta is folded."""
    cfg = federation_cfg(tiny_model_dir, tmp_path / "dp", method, rounds=1, **{"privacy.epsilon": 6.0})
    rows = run_federation(RecordingGrid(2), cfg, tmp_path / "dp")  # type: ignore[arg-type]
    assert rows[0]["clients_accepted"] == 2 and 0 < rows[0]["epsilon"] <= 6.0 and rows[0]["train_loss"] is None
    state = load_checkpoint(tmp_path / "dp" / "checkpoint.npz").state
    assert all(np.abs(v).max() > 0 for k, v in state.items() if k.endswith(DELTA_SUFFIX))
    return state
