"""Helpers for the tests of LoRA-based methods (FedSA-LoRA, RoLoRA): a method's configuration
and model on the tiny BERT, and the effective weight update dW of every LoRA layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import get
from fedpeft.adapters.lora import lora_layers
from fedpeft.tasks.seq_cls import load_base_model

__all__ = ["assert_mean_dw", "delta_w", "dp_simulation", "method_cfg", "method_model", "numpy_state"]


def method_cfg(tiny_cfg: Any, method: str, **train: Any) -> Any:
    """``tiny_cfg`` for ``method``, with ``train`` fields replaced."""
    return dataclasses.replace(tiny_cfg, adapter=dataclasses.replace(tiny_cfg.adapter, method=method),
                               train=dataclasses.replace(tiny_cfg.train, **train))


def method_model(cfg: Any) -> tuple[Any, torch.nn.Module]:
    """(plugin, the tiny model with the plugin's adapter attached)."""
    plugin = get(cfg.adapter.method)
    return plugin, plugin.attach(load_base_model(cfg.model, 2, head_seed=cfg.adapter.seed), cfg)


def numpy_state(state: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


@torch.no_grad()
def delta_w(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Effective update of every LoRA layer, layer(I) - base(I) (eval mode)."""
    model.eval()
    out = {}
    for name, layer in lora_layers(model):
        eye = torch.eye(layer.base_layer.in_features)  # type: ignore[union-attr,arg-type]
        out[name] = (layer(eye) - layer.base_layer(eye)).numpy().astype(np.float64)  # type: ignore[operator]
    return out


def assert_mean_dw(got: dict[str, np.ndarray], deltas: Sequence[dict[str, np.ndarray]],
                                 weights: Sequence[float]) -> None:
    """``got`` (the aggregate's dW) is the weighted mean of the clients' ``deltas``, to float precision."""
    w = np.asarray(weights) / sum(weights)
    assert got
    for name in got:
        want = sum(wi * d[name] for wi, d in zip(w, deltas, strict=True))
        assert np.abs(want).max() > 1e-4, "the perturbation must change dW"
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-6)


def dp_simulation(cfg: Any, tmp_path: Path, epsilon: float = 8.0) -> tuple[Path, list[dict[str, Any]]]:
    """A real Flower simulation (Ray) of ``cfg`` with DP-SGD at ``epsilon``; asserts that every
    round accepted every client and returns (run directory, rows)."""
    from fedpeft.sim.simulate import simulate

    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "run"),
                              privacy=dataclasses.replace(cfg.privacy, epsilon=epsilon))
    path, rows = simulate(cfg, run_dir=tmp_path / "run")
    assert len(rows) == cfg.train.rounds and all(r["clients_accepted"] == cfg.train.clients for r in rows)
    assert all(r["bytes_up"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    return path, rows
