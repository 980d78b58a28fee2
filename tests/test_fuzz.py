"""Property-based tests (hypothesis): malformed client replies are always rejected with a
reason and never reach the average; malformed configurations always end with exit status
2 and one line, never a traceback."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedpeft.adapters import get, names
from fedpeft.cli import main as cli
from fedpeft.load import parse_config
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import Rejected, StateSpec, reply_budget, validate_reply

SPEC = StateSpec({"b.q": ((4, 3), "float32"), "b.v": ((4, 3), "float32"), "head": ((2,), "float32")},
                 frozen_hash="f" * 64)
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _good(value: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, np.float32) for k, (shape, _) in SPEC.tensors.items()}


# ---- malformed replies ------------------------------------------------------------------

@st.composite
def corrupted(draw: st.DrawFn) -> tuple[RecordDict, str]:
    """A reply with exactly one kind of corruption, and that kind's name."""
    state: dict[str, Any] = _good(draw(st.floats(-10, 10, allow_nan=False, width=32)))
    examples: Any = draw(st.integers(1, 10_000))
    frozen: Any = SPEC.frozen_hash
    metrics_ok, arrays_ok = True, True
    name = draw(st.sampled_from(sorted(SPEC.tensors)))
    kind = draw(st.sampled_from(["nonfinite", "shape", "dtype", "missing", "extra", "huge", "hash", "examples",
                                 "no-metrics", "two-arrays"]))
    if kind == "nonfinite":
        arr = state[name].copy()
        idx = draw(st.integers(0, arr.size - 1))
        arr.flat[idx] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        state[name] = arr
    elif kind == "shape":
        shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple))
        assume(shape != SPEC.tensors[name][0])
        state[name] = np.zeros(shape, np.float32)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]))
        state[name] = state[name].astype(dtype)
    elif kind == "missing":
        del state[name]
    elif kind == "extra":
        state[draw(st.text(min_size=1, max_size=12).filter(lambda s: s not in SPEC.tensors))] = np.zeros(2, np.float32)
    elif kind == "huge":  # right shape, dtype and values, padded past the byte budget (validation module doc)
        padding = draw(st.integers(reply_budget(SPEC) - SPEC.nbytes, 2_000_000))
    elif kind == "hash":
        frozen = draw(st.one_of(st.text(max_size=70), st.integers())).__str__()
        assume(frozen != SPEC.frozen_hash)
    elif kind == "examples":
        examples = draw(st.one_of(
            st.integers(max_value=0), st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
            st.floats(min_value=1e10, allow_infinity=False), st.booleans(), st.text(max_size=5),
        ))
    elif kind == "no-metrics":
        metrics_ok = False
    elif kind == "two-arrays":
        arrays_ok = False
    arrays = state_to_arrayrecord(state)
    if kind == "huge":
        arr = arrays[name]
        arrays[name] = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data + b"\0" * padding)
    content: dict[str, Any] = {"arrays": arrays,
                               "info": ConfigRecord({"client": "x", "frozen-hash": frozen})}
    if metrics_ok:
        numeric = isinstance(examples, (int, float)) and not isinstance(examples, bool)
        # Flower's MetricRecord itself refuses non-numbers: those travel (wrongly) as config text
        content["metrics"] = MetricRecord({"num-examples": examples} if numeric else {"train-loss": 0.1})
        if not numeric:
            content["info"]["num-examples"] = str(examples)
    if not arrays_ok:
        content["arrays2"] = ArrayRecord({"b.q": Array(np.zeros((4, 3), np.float32))})
    return RecordDict(content), kind


@FUZZ
@given(corrupted())
def test_every_corruption_is_rejected_with_a_reason(case: tuple[RecordDict, str]) -> None:
    content, kind = case
    with pytest.raises(Rejected) as info:
        validate_reply(content, SPEC)
    assert str(info.value).strip(), kind
    if kind == "huge":
        assert "payload larger than expected" in str(info.value)


@FUZZ
@given(corrupted(), st.floats(-5, 5, allow_nan=False, width=32))
def test_a_corrupted_reply_never_reaches_the_average(flwr_identity, case: tuple[RecordDict, str], value: float) -> None:  # type: ignore[no-untyped-def]
    content, _ = case
    strategy = AdapterAvg.from_config(get("ffa_lora"), parse_config({"privacy.epsilon": "inf"}), SPEC, "", "h")
    sent = Message(content=RecordDict({"arrays": state_to_arrayrecord(_good())}), dst_node_id=1, message_type="train")
    good = RecordDict({"arrays": state_to_arrayrecord(_good(value)), "metrics": MetricRecord({"num-examples": 5}),
                       "info": ConfigRecord({"client": "g", "frozen-hash": SPEC.frozen_hash})})
    replies = [Message(content=content, reply_to=sent), Message(content=good, reply_to=sent)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and len(strategy.report.accepted) == 1 and len(strategy.report.rejected) == 1
    for k, v in _good(value).items():
        np.testing.assert_array_equal(arrays[k].numpy(), v)


# ---- malformed configurations -----------------------------------------------------------

_NOT_A_NUMBER = st.text(min_size=1, max_size=8).filter(lambda s: not _is_number(s))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _not_in(allowed: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=10).filter(lambda s: s.strip() not in allowed)


def _ints_outside(lo: int, hi: int | None = None) -> st.SearchStrategy[Any]:
    """Integers below ``lo`` or above ``hi``, non-numbers, and non-integral numbers."""
    above = [st.integers(min_value=hi + 1, max_value=10**12)] if hi is not None else []
    return st.one_of(st.integers(max_value=lo - 1), *above, _NOT_A_NUMBER, st.floats(0.1, 0.9).map(lambda x: lo + x))


def _floats_outside(lo: float, hi: float) -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(max_value=lo, allow_nan=False).filter(lambda x: x <= lo),
                     st.floats(min_value=hi, allow_nan=False).filter(lambda x: x >= hi), st.just(math.nan),
                     _NOT_A_NUMBER)


INVALID: dict[str, st.SearchStrategy[Any]] = {
    "train.rounds": _ints_outside(1, 100_000),
    "train.clients": _ints_outside(1, 100_000),
    "train.batch_size": _ints_outside(1),
    "train.local_steps": _ints_outside(0, 100_000),
    "train.local_epochs": _floats_outside(0.0, 1000.5),
    "train.lr": _floats_outside(0.0, math.inf),
    "train.optimizer": _not_in(("adam", "sgd")),
    "adapter.rank": _ints_outside(1, 1024),
    "adapter.method": _not_in(tuple(names())),
    "privacy.epsilon": st.one_of(st.floats(max_value=0.0), _NOT_A_NUMBER),
    "privacy.delta": _floats_outside(0.0, 1.0),
    "privacy.clip": _floats_outside(0.0, math.inf),
    "privacy.accountant": _not_in(("pld",)),
    "data.partition": _not_in(("iid", "dirichlet", "label-proportions", "by-column")),
    "data.label_proportions": st.sampled_from(["0.5,0.6;0.9,0.1;0.5,0.5", "a,b", "1;0.5,0.5", "-1,2;0,1;1,0"]),
    "data.path": st.text(min_size=1, max_size=12).map(lambda s: f"/nonexistent/{s}.csv"),
    "model.path": st.text(min_size=1, max_size=12).map(lambda s: f"/nonexistent/{s}"),
    "model.max_length": _ints_outside(8, 4096),
    "faults.fail_rate": _floats_outside(0.0, 0.999999).filter(lambda x: not (isinstance(x, float) and 0 <= x < 1)),
    "faults.on_too_few": _not_in(("retry", "skip")),
    "central.mode": _not_in(("off", "server")),
}


@st.composite
def invalid_config(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:  # an unknown key (prefixed so it can never exist)
        section = draw(st.sampled_from(["train", "privacy", "model", "faults", "nonsense"]))
        return {f"{section}.zz_{draw(st.from_regex(r'[a-z_]{1,12}', fullmatch=True))}": draw(st.integers(0, 5))}
    key = draw(st.sampled_from(sorted(INVALID)))
    return {key: draw(INVALID[key])}


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpeft.sim.simulate as sim

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an invalid configuration reached the simulation")

    monkeypatch.setattr(sim, "simulate", refuse)


@FUZZ
@given(invalid_config())
def test_invalid_config_flag_exits_2_with_one_line(no_simulation, capsys, raw: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    ((key, value),) = raw.items()
    code, err = _run_cli(["-q", "simulate", "--set", f"{key}={value}"], capsys)
    assert code == 2, (raw, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedpeft: error:") and "Traceback" not in err, (raw, err)


@FUZZ
@given(invalid_config())
def test_invalid_config_file_exits_2_with_one_line(no_simulation, capsys, tmp_path_factory, raw: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    ((key, value),) = raw.items()
    section, name = key.split(".", 1)
    if isinstance(value, float) and math.isnan(value):
        value = "nan"
    path: Path = tmp_path_factory.mktemp("cfg") / "bad.toml"
    path.write_text(tomli_w.dumps({section: {name: value}}))
    code, err = _run_cli(["-q", "simulate", "--config", str(path)], capsys)
    assert code == 2, (raw, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedpeft: error:") and "Traceback" not in err, (raw, err)


@FUZZ
@given(st.text(max_size=200))
def test_unparsable_toml_exits_2_with_one_line(no_simulation, capsys, tmp_path_factory, text: str) -> None:  # type: ignore[no-untyped-def]
    broken = text + "\n[[= broken"
    try:
        tomllib.loads(broken)
        pytest.skip("accidentally valid TOML")
    except tomllib.TOMLDecodeError:
        pass
    path: Path = tmp_path_factory.mktemp("cfg") / "bad.toml"
    path.write_text(broken, encoding="utf-8")
    code, err = _run_cli(["-q", "simulate", "--config", str(path)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "not valid TOML" in lines[0] and "Traceback" not in err


def test_a_valid_configuration_is_not_rejected_by_these_tests_own_oracle() -> None:
    """Guard for the generators above: the defaults parse, so INVALID's values are the only
    reason the properties see exit status 2."""
    assert parse_config({}).train.rounds >= 1


# Positive control for the fuzzer above: a valid ``--set`` must reach the simulation with
# exactly its value (a CLI that corrupted every value would otherwise pass: each corrupted
# value is still refused or accepted by some check).
VALID: dict[str, tuple[str, Any]] = {
    "train.rounds": ("7", 7), "train.lr": ("0.003", 0.003), "train.optimizer": ("sgd", "sgd"),
    "adapter.rank": ("4", 4), "adapter.method": ("lora", "lora"), "privacy.epsilon": ("2.5", 2.5),
    "privacy.delta": ("1e-06", 1e-06), "privacy.clip": ("0.5", 0.5), "model.max_length": ("48", 48),
    "data.partition": ("iid", "iid"), "faults.fail_rate": ("0.25", 0.25), "central.mode": ("off", "off"),
    "strategy.name": ("fedavg", "fedavg"), "seed": ("3", 3),
}


@pytest.mark.parametrize("key", sorted(VALID))
def test_a_valid_set_value_reaches_the_simulation_unchanged(key: str, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import fedpeft.sim.simulate as sim

    seen: list[Any] = []

    def record(cfg: Any, **kwargs: Any) -> Any:
        seen.append(cfg)
        return "run", [{"accuracy": 0.5, "epsilon": 1.0, "epsilon_unit": "example", "delta": 1e-5, "accountant": "pld"}]

    monkeypatch.setattr(sim, "simulate", record)
    text, want = VALID[key]
    code, err = _run_cli(["-q", "simulate", "--set", f"{key}={text}"], capsys)
    assert code == 0, err
    section, _, name = key.rpartition(".")
    got = getattr(getattr(seen[0], section), name) if section else getattr(seen[0], name)
    assert got == want and type(got) is type(want)
