"""LoRA whose frozen base weights carry a server-computed delta: the base of ``fedex_lora`` and ``flora``.

Both methods keep the aggregate exact by moving part of it out of the adapter into the frozen
weight of every adapted layer: FedEx-LoRA folds the residual ``mean(B_k A_k) - mean(B) mean(A)``
(:mod:`fedpeft.adapters.fedex_lora`), FLoRA the whole stacked product ``sum_k p_k B_k A_k`` before
restarting the adapters (:mod:`fedpeft.adapters.flora`). What is folded is the sum over rounds,
``D`` per adapted layer, unscaled and float32, and the effective weight of a layer is

    W = W0 + s * (D + B @ A),    s = alpha / r (PEFT's ``scaling``).

How ``D`` travels (:class:`~fedpeft.adapters.capabilities.FrozenDelta`): it is part of the global
state the server sends, one ``<layer>.frozen_delta`` tensor of the base weight's shape
(d_out x d_in) per adapted layer, and never part of a reply (the server's reply spec is the
trainable state only, :class:`fedpeft.server.setup.ServerSetup`). ``load_state`` -- on the server
after each aggregation and on a client before training -- sets the frozen weight to
``W0 + s * D`` from a copy of W0 taken at ``attach``, so installing the same state twice is
idempotent and a resumed server (its checkpoint holds the global state, ``D`` included) gets
the same model. ``D`` is not trainable on either side.

The sum over rounds is sent, not the round's increment: a client that was not sampled last
round (partial participation), a fresh client process and a resumed run all install the right
weight from one message. The price is the download: d_out x d_in float32 values per adapted
layer every round, beside the adapter (``bytes_down`` of ``metrics.jsonl`` counts it; the
upload is the trainable state only, as LoRA's).

Privacy: ``D`` is computed by the server from the clients' released (DP-trained) A and B,
i.e. post-processing of DP outputs, and costs no privacy. Both methods need the server to use
a plain weighted mean (``strategy.name = fedavg``: a server optimiser would step ``D`` and
the adapters with momentum, and the exactness below would no longer hold) and a single-task
federation (no ``[tasks]``); client-level central DP is refused (the aggregate is not a mean of
the replies).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.adapters.base import AdapterPlugin
from fedpeft.adapters.capabilities import FrozenDelta
from fedpeft.adapters.lora import inject_lora, lora_layers
from fedpeft.config import ConfigError, RunConfig

__all__ = ["DELTA_SUFFIX", "FoldedLoraPlugin", "delta_key", "installed_delta", "lora_pairs"]

DELTA_SUFFIX = ".frozen_delta"
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"
_W0 = "_fedpeft_w0"  # layer name -> the base weight as loaded (the frozen W0)
_DELTA = "_fedpeft_frozen_delta"  # layer name -> the D now installed (float32, CPU)


def delta_key(layer: str) -> str:
    """Global-state name of layer ``layer``'s folded delta."""
    return layer + DELTA_SUFFIX


def lora_pairs(state: Mapping[str, np.ndarray]) -> list[tuple[str, str, str]]:
    """(layer, A key, B key) of every adapted layer in a LoRA state, in name order."""
    layers = sorted(k[: -len(_A)] for k in state if k.endswith(_A))
    missing = [layer + _B for layer in layers if layer + _B not in state]
    if missing:
        raise KeyError(f"state has lora_A without its lora_B, e.g. {missing[0]}")
    return [(layer, layer + _A, layer + _B) for layer in layers]


def installed_delta(model: nn.Module) -> dict[str, torch.Tensor]:
    """The D now folded into each adapted layer, by layer name."""
    return dict(getattr(model, _DELTA))


class FoldedLoraPlugin(AdapterPlugin, FrozenDelta):
    """LoRA (A and B train and travel) whose frozen weights are ``W0 + s * D`` with ``D`` from the server."""

    exact_average = True
    central_dp_compatible = False  # aggregate is not the weighted mean of the replies

    def validate_config(self, cfg: RunConfig) -> None:
        super().validate_config(cfg)
        if cfg.tasks.enabled:
            raise ConfigError("tasks", ",".join(cfg.tasks.names) or "[tasks]",
                              f"{self.name} runs single-task federations only; remove [tasks]")
        if cfg.strategy.name != "fedavg":
            raise ConfigError("strategy.name", cfg.strategy.name,
                              f"{self.name} folds an exact delta into the frozen weights, which a server optimiser "
                              "would step with momentum; allowed: fedavg")

    def attach(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        peft_model = inject_lora(model, cfg, freeze_a=False)
        w0, delta = {}, {}
        for name, layer in lora_layers(peft_model):
            weight: torch.Tensor = layer.get_base_layer().weight  # type: ignore[assignment]
            w0[name] = weight.detach().clone()
            delta[name] = torch.zeros(weight.shape, dtype=torch.float32)
        object.__setattr__(peft_model, _W0, w0)
        object.__setattr__(peft_model, _DELTA, delta)
        return peft_model

    def frozen_delta(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {delta_key(n): d for n, d in installed_delta(model).items()}

    def install_delta(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Set every adapted layer's frozen weight to ``W0 + s * D`` with D from ``state``; a
        state without every layer's D is an error (the cached model of a client process would
        otherwise keep another run's or client's delta)."""
        layers = lora_layers(model)
        missing = [delta_key(n) for n, _ in layers if delta_key(n) not in state]
        if missing:
            raise KeyError(f"state lacks {len(missing)} frozen deltas, e.g. {missing[0]!r}: a {self.name} "
                           "global state carries one per adapted layer")
        w0: dict[str, torch.Tensor] = getattr(model, _W0)
        current: dict[str, torch.Tensor] = getattr(model, _DELTA)
        with torch.no_grad():
            for name, layer in layers:
                value = state[delta_key(name)]
                d = (value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)))
                d = d.detach().to("cpu", torch.float32).clone()
                if tuple(d.shape) != tuple(w0[name].shape):
                    raise ValueError(f"{delta_key(name)}: shape {tuple(d.shape)} != base weight {tuple(w0[name].shape)}")
                weight: torch.Tensor = layer.get_base_layer().weight  # type: ignore[assignment]
                scale = float(layer.scaling["default"])
                weight.copy_((w0[name].to(torch.float32) + scale * d).to(weight.device, weight.dtype))
                current[name] = d

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install the frozen delta, then the trainable tensors."""
        self.install_delta(model, state)
        super().load_state(model, {k: v for k, v in state.items() if not k.endswith(DELTA_SUFFIX)})

    def export(self, model: nn.Module, directory: Path) -> None:
        """PEFT's adapter plus ``frozen_delta.npz`` (the unscaled D per layer): the adapter alone
        is not the model, it must be loaded on ``W0 + s * D``."""
        super().export(model, directory)
        Path(directory).mkdir(parents=True, exist_ok=True)
        np.savez(Path(directory) / "frozen_delta.npz",
                 **{k: v.numpy() for k, v in self.frozen_delta(model).items()})  # type: ignore[arg-type]
