"""Server optimisers: what the server does with the round's pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, treat the change
the clients' aggregate asks for, ``Δ = aggregate − x`` (``x`` the global state the round sent
out), as a gradient for a server-side optimiser. One interface, :class:`ServerOptimizer`
(Opacus style: implementations behind it, each with ``state_dict`` / ``load_state_dict`` so the
moments travel in the checkpoint and a resumed run continues bit-identically); each
implementation is one update rule:

* :class:`FedAvgM` (Hsu et al., 2019, server momentum): ``m ← β·m + Δ``, ``x ← x + η·m``;
* :class:`FedAdagrad`: ``m ← β1·m + (1−β1)·Δ``, ``v ← v + Δ²``;
* :class:`FedAdam`: the same ``m``, ``v ← β2·v + (1−β2)·Δ²``;
* :class:`FedYogi`: the same ``m``, ``v ← v − (1−β2)·Δ²·sign(v − Δ²)``;

and the three adaptive ones step ``x ← x + η·m / (√v + τ)``. As in the paper's Algorithm 2,
``m`` starts at 0 and ``v`` at ``τ²`` (its ``v₋₁ ≥ τ²``, the smallest allowed), and there is no
Adam-style bias correction (Flower's ``FedAdam`` adds one and starts ``v`` at 0). Everything is
per tensor, element-wise, in float64; the new tensor is cast back to the aggregate's dtype.
The moments are kept in float64.

Which tensors: every floating-point tensor of the aggregate (the adapter plugin's state: for
FFA-LoRA every ``lora_B`` and the head, never A) that the sent-out state has with the same
shape. Anything else (a new name, a changed shape, integer or boolean masks) is the aggregate's value unchanged, and
its moments are forgotten. A tensor the aggregate leaves as it was (``Δ = 0`` every round, e.g.
a mask copied from the previous state) stays where it is: its ``m`` stays 0.

Privacy: the step is a function of the aggregate of the clients' DP-SGD outputs and of the
server's earlier releases only -- post-processing, so it costs no privacy. (Client-level central
DP is another matter: its noise is added *after* the base strategy, so the moments would be
built from un-noised aggregates; :mod:`fedpeft.config.checks` refuses that combination.)

Exactness: FFA-LoRA's ``ΔW = (α/r)·B·A`` is linear in B for the frozen, shared A, so the
pseudo-gradient on B times A is exactly the clients' mean change of ``ΔW`` (no mean-of-B times
mean-of-A error), and server and clients hold the same model ``W0 + (α/r)·B·A``. FedAvgM, linear
too, is then exactly server momentum on ``ΔW``; the adaptive rules precondition element-wise in
B's coordinates (``v`` of B, not of ``ΔW``), i.e. they are Adam & co. on the parameters that
travel, as Reddi et al. define them for any model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedpeft.adapters.base import NDArrays
from fedpeft.config import STRATEGY_OPTIONS, StrategyConfig
from fedpeft.strategies.state import StateDict

__all__ = ["OPTIMIZERS", "FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]


class ServerOptimizer(ABC):
    """One server-side update rule over per-tensor moments (module doc).

    Subclasses name their moment ``slots`` (``m``, ``v``), say how a slot starts
    (:meth:`initial`) and implement :meth:`update`: given a tensor's pseudo-gradient (float64)
    and its moments, update the moments in place and return the step to add to the tensor.
    """

    name: ClassVar[str]
    formula: ClassVar[str]
    slots: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.moments: dict[str, NDArrays] = {slot: {} for slot in self.slots}

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The ``[strategy]`` keys this rule reads (the schema's :data:`~fedpeft.config.STRATEGY_OPTIONS`)."""
        return STRATEGY_OPTIONS[cls.name]

    def initial(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        """A slot's value before the first round: zeros."""
        return np.zeros(shape, np.float64)

    @abstractmethod
    def update(self, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        """Update ``moments`` (slot -> float64 array, replaced in the dict) from ``delta``;
        return the step added to the tensor."""

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> NDArrays:
        """The new global state: ``x + step(Δ)`` for every tensor this rule covers (module doc),
        ``aggregate``'s value for every other one. ``current`` is the state the round sent out."""
        out: NDArrays = {}
        for key, agg in aggregate.items():
            agg = np.asarray(agg)
            cur = current.get(key)
            if cur is None or np.shape(cur) != agg.shape or not np.issubdtype(agg.dtype, np.floating):
                for slot in self.slots:
                    self.moments[slot].pop(key, None)
                out[key] = agg
                continue
            x = np.asarray(cur, dtype=np.float64)
            delta = agg.astype(np.float64) - x
            moments = {slot: self.moments[slot].get(key, self.initial(slot, agg.shape)) for slot in self.slots}
            x = x + self.update(delta, moments)
            for slot in self.slots:
                self.moments[slot][key] = moments[slot]
            out[key] = x.astype(agg.dtype)
        return out

    # ---- state (checkpoints) ---------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """The rule's name and its moments (slot -> tensor name -> float64 array), copied."""
        return {"name": self.name,
                "moments": {slot: {k: np.array(v, copy=True) for k, v in arrays.items()}
                            for slot, arrays in self.moments.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (ValueError for another rule or a malformed one)."""
        if state.get("name") != self.name:
            raise ValueError(f"server optimiser state is for {state.get('name')!r}, this run's is {self.name!r}")
        moments = state.get("moments")
        if not isinstance(moments, Mapping) or set(moments) != set(self.slots):
            raise ValueError(f"{self.name} state: moments must have the slots {', '.join(self.slots)}")
        loaded: dict[str, NDArrays] = {}
        for slot in self.slots:
            arrays = moments[slot]
            if not isinstance(arrays, Mapping) or not all(isinstance(v, np.ndarray) for v in arrays.values()):
                raise ValueError(f"{self.name} state: moments[{slot!r}] must map names to arrays")
            loaded[slot] = {str(k): np.array(v, dtype=np.float64, copy=True) for k, v in arrays.items()}
        self.moments = loaded


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): ``m ← β·m + Δ``, ``x ← x + η·m``."""

    name = "fedavgm"
    formula = "m <- momentum*m + D; x <- x + server_lr*m   (Hsu et al. 2019)"
    slots = ("m",)

    def update(self, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        moments["m"] = self.cfg.momentum * moments["m"] + delta
        return self.cfg.server_lr * moments["m"]


class _Adaptive(ServerOptimizer):
    """The shared part of Reddi et al.'s Algorithm 2: first moment, ``v`` from ``τ²``, the step."""

    slots = ("m", "v")

    def initial(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        if slot == "v":
            return np.full(shape, self.cfg.tau ** 2, np.float64)
        return super().initial(slot, shape)

    @abstractmethod
    def second(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """The rule's new ``v`` from the old one and ``Δ²``."""

    def update(self, delta: np.ndarray, moments: dict[str, np.ndarray]) -> np.ndarray:
        b1 = self.cfg.beta_1
        moments["m"] = b1 * moments["m"] + (1.0 - b1) * delta
        moments["v"] = self.second(moments["v"], delta * delta)
        return self.cfg.server_lr * moments["m"] / (np.sqrt(moments["v"]) + self.cfg.tau)


_STEP = "x <- x + server_lr*m/(sqrt(v)+tau)"


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021, Alg. 2): ``v ← v + Δ²``."""

    name = "fedadagrad"
    formula = f"m <- beta_1*m + (1-beta_1)*D; v <- v + D^2; {_STEP}   (Reddi et al. 2021)"

    def second(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021, Alg. 2): ``v ← β2·v + (1−β2)·Δ²``."""

    name = "fedadam"
    formula = f"m <- beta_1*m + (1-beta_1)*D; v <- beta_2*v + (1-beta_2)*D^2; {_STEP}   (Reddi et al. 2021)"

    def second(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        b2 = self.cfg.beta_2
        return b2 * v + (1.0 - b2) * delta_sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021, Alg. 2): ``v ← v − (1−β2)·Δ²·sign(v − Δ²)``."""

    name = "fedyogi"
    formula = (f"m <- beta_1*m + (1-beta_1)*D; v <- v - (1-beta_2)*D^2*sign(v-D^2); {_STEP}   "
               "(Reddi et al. 2021)")

    def second(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.cfg.beta_2) * delta_sq * np.sign(v - delta_sq)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {c.name: c for c in (FedAvgM, FedAdagrad, FedAdam, FedYogi)}
"""``strategy.name`` -> server optimiser (D = the pseudo-gradient, aggregate − sent-out state)."""
