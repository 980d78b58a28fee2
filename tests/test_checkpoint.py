"""The checkpoint file itself (:mod:`fedpeft.server.checkpoint`), pinned where ``make mutation``
found it loose (``benchmarks/results/mutation.md``): stateful round hooks are named by class with
``#2``, ``#3`` for repeats and each gets its own state back; a checkpoint whose hooks are not the
run's is refused with the names; nested component state with arrays, tuples and non-finite
floats comes back exactly; a file of another format version, or with a damaged component
section, is refused with its reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpeft.server.checkpoint import (
    Checkpoint,
    hook_states,
    load_checkpoint,
    restore,
    round_checkpoint,
    save_checkpoint,
)


class Clock:
    """A stateful round hook: its state is whatever it was given."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class Timer(Clock):
    """Another stateful hook class."""


class Plain:
    """A hook without state (not Stateful): never in a checkpoint."""


def _saved(tmp_path: Path, hooks: list[Any], state: dict[str, np.ndarray] | None = None) -> Checkpoint:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, round_checkpoint(3, "h", state or {"w": np.ones(2, np.float32)}, object(), [], {}, [],
                                           hooks))
    return load_checkpoint(path)


def test_stateful_hooks_are_named_by_class_and_each_gets_its_own_state_back(tmp_path: Path) -> None:
    hooks = [Clock({"t": 1.0}), Plain(), Clock({"t": 2.0}), Timer({"t": 3.0}), Clock({"t": 4.0})]
    assert list(hook_states(hooks)) == ["Clock", "Clock#2", "Timer", "Clock#3"]
    ckpt = _saved(tmp_path, hooks)
    assert ckpt.hooks == {"Clock": {"t": 1.0}, "Clock#2": {"t": 2.0}, "Timer": {"t": 3.0}, "Clock#3": {"t": 4.0}}
    fresh = [Clock(), Plain(), Clock(), Timer(), Clock()]
    restore(ckpt, object(), fresh)
    assert [getattr(h, "state", None) for h in fresh] == [{"t": 1.0}, None, {"t": 2.0}, {"t": 3.0}, {"t": 4.0}]


def test_a_checkpoint_whose_hooks_are_not_the_runs_is_refused_with_their_names(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, [Clock({}), Timer({})])
    with pytest.raises(ValueError, match=r"^the checkpoint holds the state of Timer, which this run does not have "
                                         r"\(a heterogeneous scenario or central DP the run had\); resume the run "
                                         r"as it was started$"):
        restore(ckpt, object(), [Clock()])
    with pytest.raises(ValueError, match=r"^the checkpoint holds no state for Clock#2, Timer#2, which the run did "
                                         r"not have; resume the run as it was started$"):
        restore(ckpt, object(), [Clock(), Clock(), Timer(), Timer()])
    with pytest.raises(ValueError, match=r"^the checkpoint holds the state of Clock, Timer, which"):
        restore(ckpt, object(), [Plain()])
    clock = Clock()
    with pytest.raises(ValueError, match="holds the state of Timer"):
        restore(ckpt, object(), [clock])
    assert clock.state is None  # refused before any hook was given a state


def test_nested_component_state_comes_back_exactly(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    state = {"a": arr, "list": [1, np.ones(2, np.int32), {"x": float("inf")}],
             "tuple": (float("-inf"), "nan-free"), "n": float("nan"), 3: "int key"}
    got = _saved(tmp_path, [Clock(state)]).hooks["Clock"]
    assert set(got) == {"a", "list", "tuple", "n", "3"}
    assert isinstance(got["a"], np.ndarray) and got["a"].dtype == np.float64 and np.array_equal(got["a"], arr)
    assert got["list"][0] == 1 and got["list"][2] == {"x": float("inf")}
    assert got["list"][1].dtype == np.int32 and np.array_equal(got["list"][1], np.ones(2, np.int32))
    assert got["tuple"] == [float("-inf"), "nan-free"] and np.isnan(got["n"]) and got["3"] == "int key"


def test_another_format_version_is_refused_with_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(1, "h", {"w": np.zeros(1)}))
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["__meta__"]))
    for version in (1, None):
        meta["format"] = version
        arrays["__meta__"] = np.array(json.dumps(meta))
        with path.open("wb") as fh:
            np.savez(fh, **arrays)
        with pytest.raises(ValueError, match=rf"^{path}: checkpoint format {version!r}, this fedpeft reads 2$"):
            load_checkpoint(path)


def _rewrite_meta(path: Path, **changes: Any) -> None:
    """Change the JSON part of a saved checkpoint (a key set to None is removed)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["__meta__"]))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    arrays["__meta__"] = np.array(json.dumps(meta))
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def test_a_long_strategy_chain_keeps_its_order(tmp_path: Path) -> None:
    chain = [[f"S{i}", {"i": i}] for i in range(12)]  # "10." sorts before "2." as text
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(1, "h", {"w": np.zeros(1)}, chain))
    assert load_checkpoint(path).strategy == chain


def test_strategy_names_and_lists_of_arrays_come_back_exactly(tmp_path: Path) -> None:
    """A component's name is any string (a plugin's dotted name stays whole), and every array of
    a list keeps its own place in the file (they must not share one member name)."""
    first, second = np.arange(3, dtype=np.float32), np.full(3, 7.0, np.float32)
    chain = [["acme.fedx.v2", {"moments": [first, second]}], ["plain", {"n": 1}]]
    hooks = {"Clock": [np.ones(2), np.zeros(2)]}
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(1, "h", {"w": np.zeros(1)}, chain, hooks))
    got = load_checkpoint(path)
    assert [name for name, _ in got.strategy] == ["acme.fedx.v2", "plain"]
    moments = got.strategy[0][1]["moments"]
    assert np.array_equal(moments[0], first) and np.array_equal(moments[1], second)
    assert np.array_equal(got.hooks["Clock"][0], np.ones(2)) and np.array_equal(got.hooks["Clock"][1], np.zeros(2))


def test_epsilon_accountants_and_rows_come_back_typed_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(4, "h", {"w": np.zeros(1)}, [], {}, [{"round": 1, "eps": float("-inf")}],
                                     {"0": 1, "1": float("inf")}, ["rdp", "prv"]))
    got = load_checkpoint(path)
    assert got.server_round == 4 and isinstance(got.server_round, int) and got.config_hash == "h"
    assert got.epsilon == {"0": 1.0, "1": float("inf")} and all(type(v) is float for v in got.epsilon.values())
    assert got.accountants == ["prv", "rdp"] and got.rows == [{"round": 1, "eps": float("-inf")}]
    assert got.strategy == [] and got.hooks == {} and got.previous == {} and got.rng_state is None
    _rewrite_meta(path, rows=None, epsilon=None, accountants=None, strategy=None, hooks=None)
    bare = load_checkpoint(path)  # only the required entries: the rest is empty
    assert (bare.rows, bare.epsilon, bare.accountants, bare.strategy, bare.hooks) == ([], {}, [], [], {})


@pytest.mark.parametrize(("strategy", "hooks"), [
    ({"0.AdapterAvg": {"previous": {"w": {"__array__": "strategy/0.AdapterAvg/previous/gone"}}}}, {}),
    ({"AdapterAvg": {}}, {}),  # no chain index
    ({}, {"Clock": {"__array__": "hooks/Clock/missing"}}),
])
def test_a_damaged_component_section_is_refused_with_its_reason(tmp_path: Path, strategy: Any, hooks: Any) -> None:
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(1, "h", {"w": np.zeros(1)}))
    _rewrite_meta(path, strategy=strategy, hooks=hooks)
    with pytest.raises(ValueError, match=rf"^{path}: not a readable fedpeft checkpoint \(component state: .+\)$"):
        load_checkpoint(path)


def test_an_unreadable_file_is_refused_with_its_path_and_cause(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    with pytest.raises(ValueError, match=rf"^{path}: not a readable fedpeft checkpoint \(.+\)$"):
        load_checkpoint(path)  # missing
    np.savez(path, x=np.zeros(1))  # an npz, but not one of ours (no meta)
    with pytest.raises(ValueError, match=rf"^{path}: not a readable fedpeft checkpoint \(.+\)$"):
        load_checkpoint(path)


def test_round_checkpoint_keeps_a_copy_of_what_the_loop_gives_it() -> None:
    state, rows, epsilon, accountants = {"w": np.ones(2)}, [{"round": 1}], {"0": 0.5}, ["prv"]
    ckpt = round_checkpoint(2, "h", state, object(), rows, epsilon, accountants, [Clock({"t": 1.0})])
    state["x"], epsilon["1"] = np.zeros(1), 1.0  # the loop goes on with its own objects
    rows.append({"round": 2})
    accountants.append("rdp")
    assert ckpt.server_round == 2 and ckpt.config_hash == "h" and set(ckpt.state) == {"w"}
    assert ckpt.rows == [{"round": 1}] and ckpt.epsilon == {"0": 0.5} and ckpt.accountants == ["prv"]
    assert ckpt.strategy == [["object", None]] and ckpt.hooks == {"Clock": {"t": 1.0}}
