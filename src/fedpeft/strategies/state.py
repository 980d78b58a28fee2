"""What a checkpoint asks a strategy chain for: state dicts, and the chain they come from.

A strategy wrapper, Flower style, keeps the strategy it wraps as ``.strategy``
(:class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping` does, and so do
fedpeft's own wrappers); the innermost one -- the *base* strategy -- is the one that samples
clients and aggregates (:class:`~fedpeft.strategies.adapter_avg.AdapterAvg`). So a run's
strategy is a chain, outermost first, and :func:`strategy_chain` walks it.

Every stateful part exposes ``state_dict()`` / ``load_state_dict(state)`` (torch and Opacus
style; the :class:`Stateful` protocol): a dict of JSON values (numbers, strings, lists,
dicts with string keys, ``None``) and numpy arrays, so a checkpoint can hold it without
pickles (:mod:`fedpeft.server.checkpoint`). Each part's state is its *own*: a wrapper does not
repeat what it wraps. :func:`chain_state_dict` collects the chain's states in order, named by
class, and :func:`load_chain_state_dict` gives them back, refusing a chain of other parts (a
run resumed with another strategy or other wrappers). A wrapper without state (a test spy)
takes part by name only.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from flwr.serverapp.strategy import Strategy

__all__ = ["StateDict", "Stateful", "Wrapper", "base_strategy", "chain_state_dict", "load_chain_state_dict",
           "sampler_from_json", "sampler_to_json", "strategy_chain"]

StateDict = dict[str, Any]
"""JSON values and numpy arrays, nested in dicts with string keys and lists."""

T = TypeVar("T")


@runtime_checkable
class Stateful(Protocol):
    """A component whose state a checkpoint saves and a resume restores."""

    def state_dict(self) -> StateDict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Wrapper(Protocol):
    """A Flower-style wrapper strategy: it keeps the strategy it wraps as ``.strategy``."""

    strategy: Strategy


def strategy_chain(strategy: Any) -> list[Any]:
    """``strategy`` and every strategy it wraps, outermost first (the base strategy last)."""
    chain = [strategy]
    while isinstance(chain[-1], Wrapper):
        chain.append(chain[-1].strategy)
    return chain


def base_strategy(strategy: Any, kind: type[T]) -> T:
    """The innermost strategy of the chain, checked to be a ``kind`` (TypeError otherwise)."""
    base = strategy_chain(strategy)[-1]
    if not isinstance(base, kind):
        raise TypeError(f"the base strategy is a {type(base).__name__}, not a {kind.__name__}")
    return base


def chain_state_dict(strategy: Any) -> list[list[Any]]:
    """``[[class name, state dict or None], ...]`` for the chain, outermost first."""
    return [[type(s).__name__, s.state_dict() if isinstance(s, Stateful) else None] for s in strategy_chain(strategy)]


def load_chain_state_dict(strategy: Any, states: list[list[Any]]) -> None:
    """Restore :func:`chain_state_dict`'s output (ValueError if the chain is another one)."""
    chain = strategy_chain(strategy)
    want = [type(s).__name__ for s in chain]
    got = [str(name) for name, _ in states]
    if got != want:
        raise ValueError(f"the checkpoint's strategy chain is {' > '.join(got) or 'empty'}, this run's is "
                         f"{' > '.join(want)}; resume with the run's own strategy and wrappers")
    for part, (name, state) in zip(chain, states, strict=True):
        if isinstance(part, Stateful):
            if state is None:
                raise ValueError(f"the checkpoint holds no state for {name}")
            part.load_state_dict(state)


def sampler_to_json(state: tuple[Any, ...]) -> list[Any]:
    """``random.Random.getstate()`` as JSON values."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def sampler_from_json(raw: Any) -> tuple[Any, ...]:
    """Inverse of :func:`sampler_to_json`, checked now (ValueError), not at the first draw."""
    try:
        version, internal, gauss = raw
        state = (int(version), tuple(int(x) for x in internal), gauss)
        random.Random().setstate(state)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a client-sampler state ({exc})") from None
    return state
