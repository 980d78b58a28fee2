"""Validation of client replies before anything is aggregated.

A reply is accepted only if its trainable state has exactly the expected tensor names,
shapes and dtypes, every value is finite, its size on the wire is within the server's byte
budget, its example count is a positive finite number, and (for shared-seed methods) the
frozen-tensor hash it reports equals the server's. Anything else is rejected with a reason
that the server logs; a rejected reply never reaches the average.

Why a byte budget beside the shape check: a Flower ``Array`` carries its declared shape and
dtype apart from its serialized bytes, and NumPy reads an ``.npy`` blob's header and data and
ignores whatever follows. A reply whose arrays declare the right shapes and hold the right
values followed by megabytes of padding passes every other check. The budget
(:func:`reply_budget`) is the spec's payload plus a serialization-header allowance per
tensor, and the bytes a reply actually carries are measured before anything is deserialized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import fedpeft.wire as wire

__all__ = ["HEADER_ALLOWANCE", "StateSpec", "ValidatedReply", "reply_budget", "validate_reply"]

MAX_EXAMPLES = 10**9
HEADER_ALLOWANCE = 256
"""Bytes per tensor allowed beyond its values: room for its serialization header (NumPy's
``.npy`` header, which Flower's ``Array`` stores, is 128 bytes for the shapes adapters have)."""


@dataclass(frozen=True)
class StateSpec:
    """What a valid trainable state looks like: name -> (shape, dtype)."""

    tensors: Mapping[str, tuple[tuple[int, ...], str]]
    frozen_hash: str = ""

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], frozen_hash: str = "") -> StateSpec:
        return cls({k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}, frozen_hash)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.tensors.values())


@dataclass(frozen=True)
class ValidatedReply:
    state: dict[str, np.ndarray]
    weight: float
    metrics: dict[str, float]
    client: str


def reply_budget(spec: StateSpec) -> int:
    """The most bytes a valid reply's arrays take: the values plus :data:`HEADER_ALLOWANCE` per tensor."""
    return spec.nbytes + HEADER_ALLOWANCE * len(spec.tensors)


class Rejected(ValueError):
    """A reply failed validation; the message is the reason."""


def _one(content: RecordDict, kind: type, label: str):  # type: ignore[no-untyped-def]
    found = [v for v in content.values() if isinstance(v, kind)]
    if len(found) != 1:
        raise Rejected(f"expected exactly one {label}, found {len(found)}")
    return found[0]


def validate_reply(content: RecordDict, spec: StateSpec, max_bytes: int | None = None) -> ValidatedReply:
    """Return the parsed reply or raise :class:`Rejected` with the reason. ``max_bytes``: the
    byte budget of the reply's arrays (default :func:`reply_budget` of ``spec``)."""
    arrays: ArrayRecord = _one(content, ArrayRecord, "ArrayRecord")
    metrics: MetricRecord = _one(content, MetricRecord, "MetricRecord")
    configs = [v for v in content.values() if isinstance(v, ConfigRecord)]
    info = dict(configs[0]) if configs else {}
    client = str(info.get(wire.CLIENT, "?"))

    weight = metrics.get(wire.NUM_EXAMPLES)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise Rejected("num-examples missing or not a number")
    if not math.isfinite(weight) or weight <= 0 or weight > MAX_EXAMPLES:
        raise Rejected(f"num-examples={weight} is not a positive count")

    if spec.frozen_hash and info.get(wire.FROZEN_HASH) != spec.frozen_hash:
        raise Rejected(f"frozen-tensor hash {str(info.get(wire.FROZEN_HASH))[:12]!r} != server's {spec.frozen_hash[:12]!r}")

    got, want = set(arrays.keys()), set(spec.tensors)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise Rejected("wrong tensor names: " + ", ".join(detail))

    budget = max_bytes if max_bytes is not None else reply_budget(spec)
    sent = sum(len(arrays[name].data) for name in spec.tensors)  # what came over the wire, before decoding
    if sent > budget:
        raise Rejected(f"payload larger than expected ({sent} > {budget} bytes)")
    state: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in spec.tensors.items():
        arr = arrays[name]
        if tuple(arr.shape) != shape:
            raise Rejected(f"{name}: shape {tuple(arr.shape)} != expected {shape}")
        if str(arr.dtype) != dtype:
            raise Rejected(f"{name}: dtype {arr.dtype} != expected {dtype}")
        value = arr.numpy()
        if value.shape != shape or str(value.dtype) != dtype:
            raise Rejected(f"{name}: data does not match its declared shape/dtype")
        if not np.all(np.isfinite(value)):
            raise Rejected(f"{name}: contains NaN or Inf")
        state[name] = value
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ValidatedReply(state=state, weight=float(weight), metrics=numeric, client=client)
