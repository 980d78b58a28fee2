"""Bad client replies are rejected with a reason and never averaged in."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters import get
from fedpeft.load import parse_config
from fedpeft.strategies.adapter_avg import AdapterAvg, state_to_arrayrecord
from fedpeft.strategies.validation import HEADER_ALLOWANCE, Rejected, StateSpec, reply_budget, validate_reply

SPEC = StateSpec({"w": ((2, 3), "float32"), "b": ((3,), "float32")}, frozen_hash="abc123")


def _state(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full((3,), value, np.float32)}


def _content(state=None, examples=10.0, frozen="abc123", client="c"):  # type: ignore[no-untyped-def]
    arrays = state_to_arrayrecord(_state() if state is None else state)
    return RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0}),
        "info": ConfigRecord({"client": client, "frozen-hash": frozen}),
    })


def test_valid_reply_passes() -> None:
    rep = validate_reply(_content(), SPEC)
    assert rep.weight == 10 and rep.client == "c" and set(rep.state) == {"w", "b"}


def _padded(content: RecordDict, name: str, extra: int) -> RecordDict:
    """``content`` with ``extra`` bytes after tensor ``name``'s serialized array: its declared
    shape and dtype and its decoded values are unchanged (NumPy ignores what follows the data)."""
    arrays = content["arrays"]
    arr = arrays[name]
    padded = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data + b"\0" * extra)
    np.testing.assert_array_equal(padded.numpy(), arr.numpy())  # passes the shape, dtype and value checks
    new = ArrayRecord({k: (padded if k == name else v) for k, v in arrays.items()})
    return RecordDict({"arrays": new, "metrics": content["metrics"], "info": content["info"]})


def test_an_oversized_reply_with_the_right_shapes_is_rejected() -> None:
    """The byte budget counts the bytes a reply carries: a tensor padded beyond the spec's values
    plus the header allowance is rejected, though its declared shape, dtype and values are right."""
    good = _content()
    carried = sum(len(a.data) for a in good["arrays"].values())
    budget = reply_budget(SPEC)
    assert budget == SPEC.nbytes + 2 * HEADER_ALLOWANCE and carried <= budget  # a real reply fits
    validate_reply(_padded(good, "w", budget - carried), SPEC)  # exactly at the budget: accepted
    with pytest.raises(Rejected, match=rf"payload larger than expected \({budget + 1} > {budget} bytes\)"):
        validate_reply(_padded(good, "w", budget - carried + 1), SPEC)
    with pytest.raises(Rejected, match="payload larger"):
        validate_reply(_padded(good, "b", 10_000_000), SPEC)
    with pytest.raises(Rejected, match="payload larger"):  # a caller's own budget
        validate_reply(good, SPEC, max_bytes=carried - 1)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_content(state={"w": _state()["w"]}), "missing"),
        (_content(state={**_state(), "lora_A": np.zeros(3, np.float32)}), "unexpected"),
        (_content(state={"w": np.zeros((3, 2), np.float32), "b": _state()["b"]}), "shape"),
        (_content(state={"w": np.zeros((2, 3), np.float64), "b": _state()["b"]}), "dtype"),
        (_content(state={"w": np.full((2, 3), np.nan, np.float32), "b": _state()["b"]}), "NaN"),
        (_content(state={"w": np.full((2, 3), np.inf, np.float32), "b": _state()["b"]}), "NaN or Inf"),
        (_content(frozen="other"), "hash"),
        (_content(examples=-5.0), "num-examples"),
        (_content(examples=0.0), "num-examples"),
        (_content(examples=float("nan")), "num-examples"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(content: RecordDict, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        validate_reply(content, SPEC)
    assert reason in str(info.value)


def test_strategy_drops_bad_replies_and_averages_the_rest(caplog: pytest.LogCaptureFixture, flwr_identity) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config({"privacy.epsilon": "inf"})
    strategy = AdapterAvg.from_config(get("ffa_lora"), cfg, SPEC, "", "h")

    def reply(content: RecordDict) -> Message:
        out = Message(content=RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(1))})}), dst_node_id=1,
                      message_type="train")
        return Message(content=content, reply_to=out)

    good1 = _content(state=_state(1.0), examples=10.0, client="a")
    good2 = _content(state=_state(3.0), examples=30.0, client="b")
    poisoned = _content(state={"w": np.full((2, 3), 1e30, np.float32) * np.inf, "b": _state()["b"]}, client="x")
    wrong_a = _content(state=_state(100.0), frozen="evil", client="y")
    oversized = _padded(_content(state=_state(100.0), client="z"), "w", 1_000_000)
    arrays, metrics = strategy.aggregate_train(1, [reply(good1), reply(poisoned), reply(good2), reply(wrong_a),
                                                   reply(oversized)])
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.5, np.float32))
    assert len(strategy.report.accepted) == 2 and len(strategy.report.rejected) == 3
    assert any("rejected reply" in r.message for r in caplog.records)
    assert any("rejected reply" in r.message and "payload larger than expected" in r.message
               for r in caplog.records)


# ---- exact reasons and boundaries (each found by `make mutation`: benchmarks/results/mutation.md) ----

def test_a_valid_reply_keeps_its_values_weight_and_numeric_metrics() -> None:
    content = _content(state=_state(2.0), examples=7)
    content["metrics"]["curve"] = [1.0, 2.0]  # not a scalar: not a metric the server averages
    rep = validate_reply(content, SPEC)
    assert rep.weight == 7.0 and isinstance(rep.weight, float) and rep.client == "c"
    assert rep.metrics == {"num-examples": 7.0, "train-loss": 0.5, "epsilon": 1.0}
    for name, value in _state(2.0).items():
        np.testing.assert_array_equal(rep.state[name], value)
        assert rep.state[name].dtype == value.dtype


def test_without_an_info_record_the_client_is_unnamed_and_only_a_frozen_hash_check_needs_it() -> None:
    content = _content()
    bare = RecordDict({"arrays": content["arrays"], "metrics": content["metrics"]})
    assert validate_reply(bare, StateSpec(SPEC.tensors)).client == "?"  # no frozen hash to compare
    with pytest.raises(Rejected, match=r"^frozen-tensor hash 'None' != server's 'abc123'$"):
        validate_reply(bare, SPEC)
    # a spec without a frozen hash accepts any the reply reports
    assert validate_reply(_content(frozen="whatever"), StateSpec(SPEC.tensors)).client == "c"
    long = StateSpec(SPEC.tensors, frozen_hash="0123456789abcdef")
    with pytest.raises(Rejected, match=r"^frozen-tensor hash 'fedcba987654' != server's '0123456789ab'$"):
        validate_reply(_content(frozen="fedcba9876543210"), long)


def test_the_example_count_is_bounded_on_both_sides() -> None:
    assert validate_reply(_content(examples=1), SPEC).weight == 1.0
    assert validate_reply(_content(examples=10**9), SPEC).weight == 1e9  # MAX_EXAMPLES itself is allowed
    for bad in (10**9 + 1, float("inf"), 0.5 - 0.5):
        with pytest.raises(Rejected, match=rf"^num-examples={bad} is not a positive count$"):
            validate_reply(_content(examples=bad), SPEC)
    content = _content()
    del content["metrics"]["num-examples"]
    with pytest.raises(Rejected, match="^num-examples missing or not a number$"):
        validate_reply(content, SPEC)


def test_records_must_be_exactly_one_of_each() -> None:
    content = _content()
    two = RecordDict({"a": content["arrays"], "b": content["arrays"], "metrics": content["metrics"]})
    with pytest.raises(Rejected, match="^expected exactly one ArrayRecord, found 2$"):
        validate_reply(two, SPEC)
    with pytest.raises(Rejected, match="^expected exactly one MetricRecord, found 0$"):
        validate_reply(RecordDict({"arrays": content["arrays"]}), SPEC)


def test_wrong_names_say_how_many_and_which() -> None:
    with pytest.raises(Rejected, match=r"^wrong tensor names: 1 missing \(e\.g\. b\)$"):
        validate_reply(_content(state={"w": _state()["w"]}), SPEC)
    with pytest.raises(Rejected, match=r"^wrong tensor names: 1 missing \(e\.g\. b\), 2 unexpected \(e\.g\. x\)$"):
        validate_reply(_content(state={"w": _state()["w"], "x": _state()["b"], "y": _state()["b"]}), SPEC)


def test_shape_and_dtype_reasons_name_the_tensor_and_both_values() -> None:
    with pytest.raises(Rejected, match=r"^w: shape \(3, 2\) != expected \(2, 3\)$"):
        validate_reply(_content(state={"w": np.zeros((3, 2), np.float32), "b": _state()["b"]}), SPEC)
    with pytest.raises(Rejected, match="^b: dtype float16 != expected float32$"):
        validate_reply(_content(state={"w": _state()["w"], "b": np.zeros(3, np.float16)}), SPEC)
    with pytest.raises(Rejected, match="^w: contains NaN or Inf$"):
        validate_reply(_content(state={"w": np.full((2, 3), -np.inf, np.float32), "b": _state()["b"]}), SPEC)


def test_data_that_contradicts_its_declared_shape_is_rejected() -> None:
    """An Array may declare (2, 3) float32 and carry a (3, 2) array's bytes: same size, other shape."""
    content = _content()
    arr = content["arrays"]["w"]
    lying = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=Array(np.zeros((3, 2), np.float32)).data)
    arrays = ArrayRecord({"w": lying, "b": content["arrays"]["b"]})
    with pytest.raises(Rejected, match="^w: data does not match its declared shape/dtype$"):
        validate_reply(RecordDict({"arrays": arrays, "metrics": content["metrics"], "info": content["info"]}), SPEC)


def test_spec_from_a_state_and_its_size() -> None:
    spec = StateSpec.from_state({"a": np.zeros((2, 5), np.float32), "b": np.zeros(3, np.float64)}, "h")
    assert spec.tensors == {"a": ((2, 5), "float32"), "b": ((3,), "float64")} and spec.frozen_hash == "h"
    assert spec.nbytes == 2 * 5 * 4 + 3 * 8
    # without a hash (the multi-task server's per-task specs) a spec checks none
    assert StateSpec.from_state({"a": np.zeros(1, np.float32)}).frozen_hash == ""
    assert reply_budget(spec) == spec.nbytes + 2 * HEADER_ALLOWANCE and HEADER_ALLOWANCE == 256
